"""The QUIC listener's configuration: its limits, its connection IDs, its certificate.

What ``gateway.quic`` is set up with, apart from the listener itself:
``QuicLimits`` (gateway config ``quic_*``); connection IDs that name this node
to a balancer in the spirit of QUIC-LB (``0x07 | server id (2 bytes) | 5 random
bytes``: ``node_cid``, read back by ``server_id_of``); the throw-away
certificate QUIC needs and nothing trusts (``self_signed``); and qh3's server
settings (``server_configuration``). No sockets, no sessions.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from qh3.quic.configuration import QuicConfiguration

from session import wire

CID_LEN = 8  # every connection ID this node chooses
CID_FIRST_OCTET = 0x07  # QUIC-LB: config rotation 0, self-encoded length 7


@dataclass(frozen=True, slots=True)
class QuicLimits:
    """What QUIC peers may hold (gateway config ``quic_*``)."""

    max_connections: int = 1024
    max_handshaking: int = 256  # connections not yet through their handshake, all sources
    max_per_source: int = 16  # open connections per source address; 0 = no limit
    retry_threshold: int = 64  # handshaking connections above which a Retry token is required
    handshake_timeout: float = 5.0
    idle_timeout: float = 60.0


def node_cid(server_id: int, random: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """A connection ID that names this node to a balancer (QUIC-LB plaintext, 8 bytes)."""
    return bytes([CID_FIRST_OCTET]) + server_id.to_bytes(2, "big") + random(CID_LEN - 3)


def server_id_of(cid: bytes) -> int | None:
    """The server id a connection ID of ours carries, or None if it is not one."""
    if len(cid) != CID_LEN or cid[0] != CID_FIRST_OCTET:
        return None
    return int.from_bytes(cid[1:3], "big")


def default_server_id(node_id: str) -> int:
    """A node's server id when none is configured: 16 bits of a hash of its node id."""
    return int.from_bytes(hashlib.blake2s(node_id.encode(), digest_size=2).digest(), "big")


def self_signed(node_id: str) -> tuple[bytes, bytes]:
    """A throw-away certificate and key (PEM): QUIC needs one, nothing trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id or "jvpn-gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_configuration(cert_pem: bytes, key_pem: bytes, idle_timeout: float) -> QuicConfiguration:
    """The listener's QUIC settings: our ALPN, DATAGRAM frames on, connection IDs of CID_LEN."""
    cfg = QuicConfiguration(is_client=False, alpn_protocols=[wire.QUIC_ALPN],
                            connection_id_length=CID_LEN, idle_timeout=idle_timeout,
                            max_datagram_frame_size=65536,
                             max_datagram_size=wire.QUIC_MAX_UDP_PAYLOAD, probe_datagram_size=False)
    cfg.load_cert_chain(cert_pem, key_pem)  # PEM contents, not paths
    return cfg
