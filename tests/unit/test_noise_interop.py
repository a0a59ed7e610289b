"""Differential test: our Noise IK against an independent implementation.

The ``noiseprotocol`` package (its own SymmetricState, HKDF, token processing)
plays the other side of full IK handshakes, in both directions:

- our initiator (session/noise.py) against its responder, and its initiator
  against our responder, with a prologue and payloads in both messages; both
  sides must agree on the handshake hash and the Split keys, and transport
  messages must decrypt both ways (and after a rekey);
- with fixed static and ephemeral keys the two implementations must also emit
  byte-identical messages;
- a tampered handshake or transport message is refused by each side;
- one handshake each way through session/handshake.py's Initiator/Responder,
  whose payloads are the project's ClientHello/ServerHello encodings.

Cacophony vectors (test_noise.py) pin the bytes; this pins the behaviour against
a second implementation, so a divergence in one mixing step fails here too.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
from cryptography.exceptions import InvalidTag
from noise.connection import Keypair, NoiseConnection  # the `noiseprotocol` package
from noise.exceptions import NoiseInvalidMessage

from session import wire
from session.errors import AuthError
from session.handshake import (
    PROLOGUE,
    ClientHello,
    Initiator,
    Responder,
    ServerHello,
    decode_client_hello,
    decode_server_payload,
    encode_client_hello,
    encode_server_hello,
)
from session.keys import derive_session_secret
from session.noise import DEFAULT_PROTOCOL, CipherState, HandshakeState, public_key
from session.reasons import DropReason

SUITES = [
    f"Noise_IK_25519_{c}_{h}"
    for c in ("ChaChaPoly", "AESGCM")
    for h in ("BLAKE2s", "BLAKE2b", "SHA256", "SHA512")
]
assert SUITES[0] == DEFAULT_PROTOCOL


def _key(label: str) -> bytes:
    """A fixed 32-byte X25519 private key (deterministic runs)."""
    return hashlib.sha256(b"jvpn noise interop " + label.encode()).digest()


CLIENT_S, CLIENT_E = _key("client static"), _key("client ephemeral")
GATEWAY_S, GATEWAY_E = _key("gateway static"), _key("gateway ephemeral")
GATEWAY_PUB = public_key(GATEWAY_S)
PROLOGUE_BYTES = PROLOGUE + bytes(range(16))  # as handshake.py builds it: tag + handshake id
PAYLOAD1 = b"client hello \x00\xff" * 3
PAYLOAD2 = b"server hello \x01\xfe" * 5
TRANSPORT = [b"", b"x", b"datagram " * 100, bytes(range(256)) * 4]


# ---- the other implementation ----------------------------------------------------------------


def _theirs(protocol: str, *, initiator: bool, prologue: bytes = PROLOGUE_BYTES,
            fixed_ephemeral: bool = True) -> NoiseConnection:
    conn = NoiseConnection.from_name(protocol.encode())
    conn.set_prologue(prologue)
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, CLIENT_S)
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, GATEWAY_PUB)
        eph = CLIENT_E
    else:
        conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, GATEWAY_S)
        eph = GATEWAY_E
    if fixed_ephemeral:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, eph)
    with warnings.catch_warnings():  # "ephemeral already set: OK for testing" is expected
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


def _their_split_keys(conn: NoiseConnection, *, initiator: bool) -> tuple[bytes, bytes]:
    """(initiator->responder, responder->initiator) keys of their Split()."""
    enc = bytes(conn.noise_protocol.cipher_state_encrypt.k)
    dec = bytes(conn.noise_protocol.cipher_state_decrypt.k)
    return (enc, dec) if initiator else (dec, enc)


# ---- ours -----------------------------------------------------------------------------------


def _our_initiator(protocol: str, prologue: bytes = PROLOGUE_BYTES,
                   fixed_ephemeral: bool = True) -> HandshakeState:
    return HandshakeState.initiator(CLIENT_S, GATEWAY_PUB, prologue,
                                    CLIENT_E if fixed_ephemeral else None, protocol)


def _our_responder(protocol: str, prologue: bytes = PROLOGUE_BYTES,
                   fixed_ephemeral: bool = True) -> HandshakeState:
    return HandshakeState.responder(GATEWAY_S, prologue,
                                    GATEWAY_E if fixed_ephemeral else None, protocol)


def _exchange_transport(our_send: CipherState, our_recv: CipherState,
                        theirs: NoiseConnection) -> None:
    """Transport messages both ways, interleaved, then both sides rekey and go on."""
    for msg in TRANSPORT:
        assert theirs.decrypt(our_send.encrypt_with_ad(b"", msg)) == msg
        assert our_recv.decrypt_with_ad(b"", bytes(theirs.encrypt(msg))) == msg
    # several in a row one way (nonces advance independently per direction)
    cts = [our_send.encrypt_with_ad(b"", m) for m in TRANSPORT]
    assert [theirs.decrypt(c) for c in cts] == TRANSPORT
    cts = [bytes(theirs.encrypt(m)) for m in TRANSPORT]
    assert [our_recv.decrypt_with_ad(b"", c) for c in cts] == TRANSPORT
    # Rekey() (spec 11.3) on both directions
    our_send.rekey()
    our_recv.rekey()
    theirs.rekey_inbound_cipher()
    theirs.rekey_outbound_cipher()
    assert theirs.decrypt(our_send.encrypt_with_ad(b"", b"after rekey ->")) == b"after rekey ->"
    assert our_recv.decrypt_with_ad(b"", bytes(theirs.encrypt(b"<- after rekey"))) == b"<- after rekey"


# ---- (a) our initiator, their responder --------------------------------------------------------


@pytest.mark.parametrize("fixed_ephemeral", [True, False], ids=["fixed-e", "fresh-e"])
@pytest.mark.parametrize("protocol", SUITES)
def test_our_initiator_their_responder(protocol: str, fixed_ephemeral: bool) -> None:
    ours = _our_initiator(protocol, fixed_ephemeral=fixed_ephemeral)
    theirs = _theirs(protocol, initiator=False, fixed_ephemeral=fixed_ephemeral)

    msg1 = ours.write_message(PAYLOAD1)
    assert bytes(theirs.read_message(msg1)) == PAYLOAD1
    msg2 = bytes(theirs.write_message(PAYLOAD2))
    assert ours.read_message(msg2) == PAYLOAD2

    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.remote_static == GATEWAY_PUB
    assert ours.split_keys() == _their_split_keys(theirs, initiator=False)

    send, recv = ours.split()  # initiator: c1 sends, c2 receives
    _exchange_transport(send, recv, theirs)


# ---- (b) their initiator, our responder --------------------------------------------------------


@pytest.mark.parametrize("fixed_ephemeral", [True, False], ids=["fixed-e", "fresh-e"])
@pytest.mark.parametrize("protocol", SUITES)
def test_their_initiator_our_responder(protocol: str, fixed_ephemeral: bool) -> None:
    theirs = _theirs(protocol, initiator=True, fixed_ephemeral=fixed_ephemeral)
    ours = _our_responder(protocol, fixed_ephemeral=fixed_ephemeral)

    msg1 = bytes(theirs.write_message(PAYLOAD1))
    assert ours.read_message(msg1) == PAYLOAD1
    assert ours.remote_static == public_key(CLIENT_S)
    msg2 = ours.write_message(PAYLOAD2)
    assert bytes(theirs.read_message(msg2)) == PAYLOAD2

    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.split_keys() == _their_split_keys(theirs, initiator=True)

    recv, send = ours.split()  # responder: c1 receives, c2 sends
    _exchange_transport(send, recv, theirs)


@pytest.mark.parametrize("protocol", SUITES)
def test_same_keys_same_bytes(protocol: str) -> None:
    """With every key fixed, both implementations write identical messages and hashes."""
    our_i, our_r = _our_initiator(protocol), _our_responder(protocol)
    their_i, their_r = _theirs(protocol, initiator=True), _theirs(protocol, initiator=False)

    msg1 = our_i.write_message(PAYLOAD1)
    assert bytes(their_i.write_message(PAYLOAD1)) == msg1
    our_r.read_message(msg1)
    their_r.read_message(msg1)
    msg2 = our_r.write_message(PAYLOAD2)
    assert bytes(their_r.write_message(PAYLOAD2)) == msg2
    our_i.read_message(msg2)
    their_i.read_message(msg2)

    hashes = {our_i.handshake_hash, our_r.handshake_hash,
              their_i.get_handshake_hash(), their_r.get_handshake_hash()}
    assert len(hashes) == 1
    c1, _ = our_i.split()
    assert c1.encrypt_with_ad(b"", b"transport") == their_i.encrypt(b"transport")


def test_prologue_is_bound_across_implementations() -> None:
    ours = _our_initiator(DEFAULT_PROTOCOL, prologue=PROLOGUE_BYTES)
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=False, prologue=PROLOGUE + bytes(16))
    with pytest.raises(InvalidTag):
        theirs.read_message(ours.write_message(PAYLOAD1))

    theirs = _theirs(DEFAULT_PROTOCOL, initiator=True, prologue=PROLOGUE + bytes(16))
    ours = _our_responder(DEFAULT_PROTOCOL, prologue=PROLOGUE_BYTES)
    with pytest.raises(AuthError) as exc:
        ours.read_message(bytes(theirs.write_message(PAYLOAD1)))
    assert exc.value.reason is DropReason.BAD_HANDSHAKE


# ---- (c) tampering ---------------------------------------------------------------------------


def _flip(msg: bytes, index: int) -> bytes:
    bad = bytearray(msg)
    bad[index] ^= 0x01
    return bytes(bad)


# a byte in e, in the encrypted s, in the payload ciphertext, in the tag
MSG1_SPOTS = [0, 40, 90, -1]
MSG2_SPOTS = [0, 40, -1]


@pytest.mark.parametrize("index", MSG1_SPOTS)
def test_tampered_msg1_each_side_refuses(index: int) -> None:
    # from us to them
    msg1 = _our_initiator(DEFAULT_PROTOCOL).write_message(PAYLOAD1)
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=False)
    with pytest.raises(InvalidTag):
        theirs.read_message(_flip(msg1, index))
    # from them to us
    msg1 = bytes(_theirs(DEFAULT_PROTOCOL, initiator=True).write_message(PAYLOAD1))
    ours = _our_responder(DEFAULT_PROTOCOL)
    with pytest.raises(AuthError) as exc:
        ours.read_message(_flip(msg1, index))
    assert exc.value.reason is DropReason.BAD_HANDSHAKE
    assert ours.remote_static is None
    # the untampered message is still good for a fresh responder
    assert _our_responder(DEFAULT_PROTOCOL).read_message(msg1) == PAYLOAD1


@pytest.mark.parametrize("index", MSG2_SPOTS)
def test_tampered_msg2_each_side_refuses(index: int) -> None:
    # their reply tampered, our initiator refuses it and still takes the genuine one
    ours = _our_initiator(DEFAULT_PROTOCOL)
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=False)
    theirs.read_message(ours.write_message(PAYLOAD1))
    msg2 = bytes(theirs.write_message(PAYLOAD2))
    with pytest.raises(AuthError) as exc:
        ours.read_message(_flip(msg2, index))
    assert exc.value.reason is DropReason.BAD_HANDSHAKE
    assert not ours.complete
    assert ours.read_message(msg2) == PAYLOAD2
    assert ours.handshake_hash == theirs.get_handshake_hash()

    # our reply tampered, their initiator refuses it
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=True)
    ours = _our_responder(DEFAULT_PROTOCOL)
    ours.read_message(bytes(theirs.write_message(PAYLOAD1)))
    msg2 = ours.write_message(PAYLOAD2)
    with pytest.raises(InvalidTag):
        theirs.read_message(_flip(msg2, index))


def test_tampered_transport_each_side_refuses() -> None:
    ours = _our_initiator(DEFAULT_PROTOCOL)
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=False)
    theirs.read_message(ours.write_message(PAYLOAD1))
    ours.read_message(bytes(theirs.write_message(PAYLOAD2)))
    send, recv = ours.split()

    ct = send.encrypt_with_ad(b"", b"to them")
    with pytest.raises(NoiseInvalidMessage):
        theirs.decrypt(_flip(ct, 3))
    assert theirs.decrypt(ct) == b"to them"  # the nonce was not consumed by the forgery

    ct = bytes(theirs.encrypt(b"to us"))
    with pytest.raises(AuthError) as exc:
        recv.decrypt_with_ad(b"", _flip(ct, -1))
    assert exc.value.reason is DropReason.BAD_AEAD
    assert recv.decrypt_with_ad(b"", ct) == b"to us"


# ---- through session/handshake.py --------------------------------------------------------------

HANDSHAKE_ID = bytes(range(100, 116))
HELLO = ClientHello(wall_ms=1_700_000_000_123, kind=wire.TransportKind.UDP, upstream="10.0.0.7:443")
SERVER_HELLO = ServerHello(
    session_id=bytes(range(16)), version=3, state=1, epoch=2, binding_id=bytes(range(16, 32)),
    node_id=b"gw-a", server_ms=1_700_000_000_456, ttl_ms=60_000, keepalive_ms=5_000,
)


def test_project_initiator_against_their_responder() -> None:
    client = Initiator(CLIENT_S, GATEWAY_PUB, HANDSHAKE_ID, HELLO, ephemeral=CLIENT_E)
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=False, prologue=PROLOGUE + HANDSHAKE_ID)
    assert decode_client_hello(bytes(theirs.read_message(client.message1))) == HELLO

    msg2 = bytes(theirs.write_message(encode_server_hello(SERVER_HELLO)))
    answer, secret = client.finish(msg2)
    assert answer == SERVER_HELLO
    k1, k2 = _their_split_keys(theirs, initiator=False)
    assert secret == derive_session_secret(k1, k2, theirs.get_handshake_hash())


def test_their_initiator_against_project_responder() -> None:
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=True, prologue=PROLOGUE + HANDSHAKE_ID)
    gateway = Responder(GATEWAY_S, HANDSHAKE_ID, bytes(theirs.write_message(encode_client_hello(HELLO))))
    assert gateway.hello == HELLO
    assert gateway.client_static == public_key(CLIENT_S)

    msg2, secret = gateway.accept(SERVER_HELLO)
    assert decode_server_payload(bytes(theirs.read_message(msg2))) == SERVER_HELLO
    k1, k2 = _their_split_keys(theirs, initiator=True)
    assert secret == derive_session_secret(k1, k2, theirs.get_handshake_hash())


def test_project_responder_refuses_their_message_under_another_handshake_id() -> None:
    theirs = _theirs(DEFAULT_PROTOCOL, initiator=True, prologue=PROLOGUE + HANDSHAKE_ID)
    msg1 = bytes(theirs.write_message(encode_client_hello(HELLO)))
    with pytest.raises(AuthError):
        Responder(GATEWAY_S, bytes(16), msg1)
