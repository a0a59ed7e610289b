"""Key schedule: from the Noise split keys to every key a session uses.

    Noise split (k1, k2) + handshake hash
        -> session secret (32 bytes; stored in the cluster only wrapped under the KEK)
            -> proof_key    client -> gateway: MAC over REATTACH_REQUEST
            -> control_key  gateway -> client: MAC over REATTACH_ACK / REJECT / NOTICE
            -> traffic keys per binding (epoch, binding_id, node_id), one per direction
        -> every REKEY (a fresh X25519 exchange in band, ``rekey_secret``) replaces the
           session secret with one derived from it and the new shared secret: once both
           sides and the store forget the old one, a later compromise (the KEK plus a
           store dump, a node's memory) cannot recompute the traffic keys used before

Every derivation is HKDF-SHA256 with its own ``b"jvpn v1 ..."`` label, so no two
purposes ever share a key. Context fields are length-prefixed or fixed-width,
so two different bindings can never encode to the same HKDF info.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from session.errors import AuthError
from session.reasons import DropReason

SESSION_SECRET_LEN = 32
KEY_LEN = 32
MAC_LEN = 32
KEK_LEN = 32
WRAP_NONCE_LEN = 12
WRAP_FORMAT_V1 = 0x01  # ChaCha20-Poly1305, AD = format | session id (no longer read or written)
# ChaCha20-Poly1305 under the KEK, AD = format | session id | policy_binding(...): the record's
# policy fields are bound to the secret, so a store writer cannot change them unnoticed.
WRAP_FORMAT_V2 = 0x02
# As format 2, with the KEK's id (``kek_id``) in the clear header and in the AD:
# ``format u8 | kek id 3 | nonce 12 | ciphertext+tag``, so a keyring (KEK rotation) picks
# the KEK that unwraps a record instead of trying each. 64 bytes in all: the most a record's
# hash value may be and keep Redis's compact listpack encoding (store/README.md, Memory),
# hence an id of 3 bytes (two KEKs of one ring share an id once in 2^24: both are tried).
WRAP_FORMAT_V3 = 0x03
WRAP_FORMAT = WRAP_FORMAT_V3  # what wrap_secret writes; a new algorithm gets a new byte
KEK_ID_LEN = 3
WRAPPED_SECRET_LEN_V2 = 1 + WRAP_NONCE_LEN + SESSION_SECRET_LEN + 16
WRAPPED_SECRET_LEN = 1 + KEK_ID_LEN + WRAP_NONCE_LEN + SESSION_SECRET_LEN + 16

_LABEL_SESSION = b"jvpn v1 session secret"
_LABEL_PROOF = b"jvpn v1 reattach proof c2g"
_LABEL_CONTROL = b"jvpn v1 control mac g2c"
_LABEL_TRAFFIC = b"jvpn v1 traffic"
_LABEL_POLICY = b"jvpn v1 record policy"
_LABEL_REGISTRY = b"jvpn v1 registry mac"
_LABEL_REKEY = b"jvpn v1 rekey"
_LABEL_CONTROL_WRAP = b"jvpn v1 wrapped control key"
_PERSON_KEK_ID = b"jvpnkid1"  # BLAKE2s personalisation (8 bytes): the KEK id is its own hash
_EPOCH = struct.Struct("!Q")


def _hkdf(ikm: bytes, info: bytes, length: int = KEY_LEN, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_session_secret(k1: bytes, k2: bytes, handshake_hash: bytes) -> bytes:
    """The session secret from the Noise split keys, bound to the handshake transcript."""
    if len(k1) != KEY_LEN or len(k2) != KEY_LEN:
        raise ValueError("Noise split keys must be 32 bytes each")
    if len(handshake_hash) not in (32, 64):
        raise ValueError("handshake hash must be 32 or 64 bytes")
    return _hkdf(k1 + k2, _LABEL_SESSION, SESSION_SECRET_LEN, salt=handshake_hash)


def rekey_secret(secret: bytes, shared: bytes, client_pub: bytes, gateway_pub: bytes,
                 generation: int) -> bytes:
    """The session secret of key ``generation`` after a REKEY: the previous secret and the
    fresh X25519 shared secret, bound to both ephemeral public keys."""
    if len(secret) != SESSION_SECRET_LEN or len(shared) != 32:
        raise ValueError("secret and shared secret must be 32 bytes")
    if len(client_pub) != 32 or len(gateway_pub) != 32 or not 0 < generation < 2**32:
        raise ValueError("bad rekey inputs")
    return _hkdf(secret + shared, _LABEL_REKEY + struct.pack("!I", generation),
                 SESSION_SECRET_LEN, salt=client_pub + gateway_pub)


def control_policy(policy: bytes) -> bytes:
    """The associated data that wraps a session's control key for its tombstone
    (``wrap_secret(kek, keys.control_key, sid, policy=control_policy(policy))``): the same
    policy binding, in another domain, so a wrapped control key never unwraps as a secret."""
    return policy + _LABEL_CONTROL_WRAP


class SessionKeys:
    """The long-lived per-session MAC keys, one per direction."""

    __slots__ = ("proof_key", "control_key")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SESSION_SECRET_LEN:
            raise ValueError("session secret must be 32 bytes")
        self.proof_key = _hkdf(secret, _LABEL_PROOF)  # client -> gateway
        self.control_key = _hkdf(secret, _LABEL_CONTROL)  # gateway -> client

    def __repr__(self) -> str:
        return "SessionKeys(<redacted>)"


def mac(key: bytes, data: bytes) -> bytes:
    """32-byte keyed BLAKE2s of ``data``."""
    if len(key) != KEY_LEN:
        raise ValueError("MAC key must be 32 bytes")
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def verify_mac(key: bytes, data: bytes, tag: bytes) -> bool:
    """Constant-time check of a ``mac`` tag."""
    return hmac.compare_digest(mac(key, data), tag)


def traffic_keys(secret: bytes, epoch: int, binding_id: bytes, node_id: bytes) -> tuple[bytes, bytes]:
    """(client_to_gateway, gateway_to_client) AEAD keys for one binding."""
    if len(secret) != SESSION_SECRET_LEN:
        raise ValueError("session secret must be 32 bytes")
    if not 0 <= epoch < 2**64:
        raise ValueError("epoch out of range")
    if not 0 < len(binding_id) <= 255 or len(node_id) > 255:
        raise ValueError("binding_id must be 1..255 bytes and node_id at most 255")
    info = (
        _LABEL_TRAFFIC
        + _EPOCH.pack(epoch)
        + bytes([len(binding_id)]) + binding_id
        + bytes([len(node_id)]) + node_id
    )
    okm = _hkdf(secret, info, 2 * KEY_LEN)
    return okm[:KEY_LEN], okm[KEY_LEN:]


# ---- wrapping the session secret for the store ------------------------------------------


def policy_binding(client_id: str, upstream: str, ttl_ms: int, reattach_rate: int,
                   transports_mask: int, max_age_ms: int | None, inner: str = "",
                   prefixes: str = "") -> bytes:
    """The canonical encoding of a session record's policy fields (``cid``, ``up``, ``ttl``,
    ``rr``, ``tk``, ``ma``), bound into the wrapped secret's associated data.

    Every field is length-prefixed (u32) and integers are written in decimal, so two
    different policies never encode alike and no value (even a tampered one) raises.
    ``max_age_ms`` None (a record born before maximum ages, without ``ma``) encodes the five
    fields alone: such a record still unwraps, and removing ``ma`` from a newer record, or
    adding one to an older record, changes the encoding (so the secret does not unwrap).
    An L3 session's inner addresses (``ia``) and allowed prefixes (``ap``) follow, behind
    their own label, only when ``inner`` is set: changing either,
    or adding or removing them, changes the encoding too.
    """
    out = [_LABEL_POLICY]
    fields = [client_id, upstream, str(int(ttl_ms)), str(int(reattach_rate)),
              str(int(transports_mask))]
    if max_age_ms is not None:
        fields.append(str(int(max_age_ms)))
    if inner:  # "l3" is no decimal: never read as a maximum age
        fields += ["l3", inner, prefixes]
    for value in fields:
        raw = value.encode("utf-8", "surrogatepass")
        out.append(struct.pack("!I", len(raw)) + raw)
    return b"".join(out)


def kek_id(kek: bytes) -> bytes:
    """The KEK's 3-byte id, written in the clear in a format-3 wrap: a personalised BLAKE2s
    of the KEK (one-way; 3 bytes tell a few KEKs apart, they do not help guess one)."""
    if len(kek) != KEK_LEN:
        raise ValueError("KEK must be 32 bytes")
    return hashlib.blake2s(kek, digest_size=32, person=_PERSON_KEK_ID).digest()[:KEK_ID_LEN]


class KekRing:
    """The KEKs a gateway holds during a rotation: ``current`` wraps (and MACs registry
    entries); ``current`` and every ``previous`` one unwrap (and verify)."""

    __slots__ = ("current", "previous")

    def __init__(self, current: bytes, previous: Iterable[bytes] = ()) -> None:
        prev = tuple(previous)
        if len(current) != KEK_LEN or any(len(k) != KEK_LEN for k in prev):
            raise ValueError("KEK must be 32 bytes")
        self.current = current
        self.previous = tuple(dict.fromkeys(k for k in prev if k != current))

    @property
    def all(self) -> tuple[bytes, ...]:
        """Every KEK of the ring, the current one first."""
        return (self.current, *self.previous)

    def with_id(self, kid: bytes) -> tuple[bytes, ...]:
        """The KEKs whose id is ``kid`` (one, or none; two only on a 1-in-2^24 clash)."""
        return tuple(k for k in self.all if kek_id(k) == kid)

    def registry_keys(self) -> tuple[bytes, ...]:
        """The registry MAC keys: the current KEK's first (``registry_key``)."""
        return tuple(registry_key(k) for k in self.all)

    def __repr__(self) -> str:
        return f"KekRing(<redacted>, {len(self.previous)} previous)"


def wrap_secret(kek: bytes, secret: bytes, session_id: bytes, *, policy: bytes,
                nonce: bytes | None = None, fmt: int = WRAP_FORMAT) -> bytes:
    """AEAD-wrap the session secret: ``format u8 | kek id 3 | nonce 12 | ciphertext+tag``
    (format 2, still written on request for tests and tools, has no KEK id).

    ``policy`` is ``policy_binding(...)`` of the fields written beside it in the record:
    it is authenticated (not stored), so the secret unwraps only with the same policy.
    """
    if len(kek) != KEK_LEN:
        raise ValueError("KEK must be 32 bytes")
    if len(secret) != SESSION_SECRET_LEN:
        raise ValueError("session secret must be 32 bytes")
    if not policy.startswith(_LABEL_POLICY):
        raise ValueError("policy must be a policy_binding() encoding")
    if fmt not in (WRAP_FORMAT_V2, WRAP_FORMAT_V3):
        raise ValueError(f"cannot write wrap format {fmt}")
    if nonce is None:
        nonce = secrets.token_bytes(WRAP_NONCE_LEN)  # random: the KEK wraps many secrets, no counter to keep
    elif len(nonce) != WRAP_NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    prefix = bytes([fmt]) + (kek_id(kek) if fmt == WRAP_FORMAT_V3 else b"")
    # The header (format byte, KEK id) is authenticated too, so it cannot be swapped to
    # steer unwrapping.
    return prefix + nonce + ChaCha20Poly1305(kek).encrypt(nonce, secret, _wrap_ad(prefix, session_id, policy))


def _wrap_ad(prefix: bytes, session_id: bytes, policy: bytes) -> bytes:
    if len(session_id) > 255:
        raise ValueError("session id must be at most 255 bytes")
    return prefix + bytes([len(session_id)]) + session_id + policy


def wrap_format(blob: bytes) -> int:
    """The format byte of a wrapped secret."""
    if not blob:
        raise AuthError(DropReason.MALFORMED, "empty wrapped secret")
    return blob[0]


def unwrap_secret(kek: bytes | KekRing, blob: bytes, session_id: bytes, *, policy: bytes) -> bytes:
    """Recover a wrapped session secret; AuthError on tampering (of the blob or of the
    policy fields given as ``policy``), a wrong session_id or a KEK not given.

    ``kek`` is one KEK or a ``KekRing``: a format-3 blob is opened with the ring's KEK of
    its id (none: refused); a format-2 blob (no id: written before KEK ids) with each KEK
    of the ring in turn. A format-1 wrap (no policy bound) is refused as unreadable:
    sessions are short-lived, a record written before the upgrade ends and its client
    handshakes again.
    """
    ring = kek if isinstance(kek, KekRing) else KekRing(kek)
    fmt = wrap_format(blob)
    if fmt == WRAP_FORMAT_V3:
        header, expected = 1 + KEK_ID_LEN, WRAPPED_SECRET_LEN
    elif fmt == WRAP_FORMAT_V2:
        header, expected = 1, WRAPPED_SECRET_LEN_V2
    else:
        raise AuthError(DropReason.MALFORMED, f"unknown wrap format {fmt}")
    if len(blob) != expected:
        raise AuthError(DropReason.MALFORMED, f"wrapped secret of {len(blob)} bytes")
    if fmt == WRAP_FORMAT_V3:
        keks = ring.with_id(blob[1:header])
        if not keks:
            raise AuthError(DropReason.BAD_AEAD, f"wrapped under an unknown KEK (id "
                                                 f"{blob[1:header].hex()}): not in this keyring")
    else:
        keks = ring.all
    nonce = blob[header:header + WRAP_NONCE_LEN]
    ad = _wrap_ad(blob[:header], session_id, policy)
    for k in keks:
        try:
            return ChaCha20Poly1305(k).decrypt(nonce, blob[header + WRAP_NONCE_LEN:], ad)
        except InvalidTag:
            continue
    raise AuthError(DropReason.BAD_AEAD, "wrapped secret failed authentication: its record's "
                                         "policy fields were changed, or another KEK")


# ---- the client registry's MAC ----------------------------------------------------------


def relay_key(kek: bytes) -> bytes:
    """The key that MACs IP packets relayed between the nodes of a cluster (routed egress)."""
    if len(kek) != KEK_LEN:
        raise ValueError("KEK must be 32 bytes")
    return _hkdf(kek, b"jvpn v1 node relay")


def registry_key(kek: bytes) -> bytes:
    """The key that MACs client registry entries, derived from the cluster KEK."""
    if len(kek) != KEK_LEN:
        raise ValueError("KEK must be 32 bytes")
    return _hkdf(kek, _LABEL_REGISTRY)


def load_kek(value: str | bytes) -> bytes:
    """A 32-byte KEK from raw bytes, 64 hex characters or base64; ValueError otherwise."""
    if isinstance(value, bytes) and len(value) == KEK_LEN:
        return value
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        text = ""
    text = text.strip()
    if len(text) == 2 * KEK_LEN:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text.encode("ascii"), validate=True) if decode is base64.b64decode else decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEK_LEN:
            return raw
    # never echo the input: it may be a (mistyped) key
    raise ValueError("KEK must be 32 raw bytes, 64 hex characters, or base64 of 32 bytes")


FINGERPRINT_HEX_CHARS = 16


def fingerprint(b: bytes) -> str:
    """A short SHA-256 hex of ``b``: log this, never nonces, proofs or keys themselves."""
    return hashlib.sha256(b).hexdigest()[:FINGERPRINT_HEX_CHARS]
