"""Noise_IK: the cacophony test vectors, then what must fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from session.errors import AuthError, LocalProtocolError
from session.noise import (
    DEFAULT_PROTOCOL,
    MAX_NONCE,
    CipherState,
    HandshakeState,
    generate_keypair,
    parse_protocol,
    public_key,
)
from session.reasons import DropReason

VECTORS_FILE = Path(__file__).parent / "vectors" / "noise_ik_cacophony.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def _pair(v: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState.initiator(
        _h(v["init_static"]), _h(v["init_remote_static"]), _h(v["init_prologue"]),
        _h(v["init_ephemeral"]), v["protocol_name"],
    )
    resp = HandshakeState.responder(
        _h(v["resp_static"]), _h(v["resp_prologue"]), _h(v["resp_ephemeral"]), v["protocol_name"],
    )
    return init, resp


def test_vector_file_covers_the_suites_we_support() -> None:
    names = {v["protocol_name"] for v in VECTORS}
    assert DEFAULT_PROTOCOL in names
    assert names == {
        f"Noise_IK_25519_{c}_{h}"
        for c in ("ChaChaPoly", "AESGCM")
        for h in ("BLAKE2s", "BLAKE2b", "SHA256", "SHA512")
    }


@pytest.mark.parametrize("v", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(v: dict[str, Any]) -> None:
    init, resp = _pair(v)
    msgs = v["messages"]
    assert len(msgs) == 6

    # handshake: -> e, es, s, ss
    ct = init.write_message(_h(msgs[0]["payload"]))
    assert ct.hex() == msgs[0]["ciphertext"]
    assert resp.remote_static is None
    assert resp.read_message(_h(msgs[0]["ciphertext"])) == _h(msgs[0]["payload"])
    assert resp.remote_static == public_key(_h(v["init_static"]))
    assert not init.complete and not resp.complete

    # <- e, ee, se
    ct = resp.write_message(_h(msgs[1]["payload"]))
    assert ct.hex() == msgs[1]["ciphertext"]
    assert init.read_message(_h(msgs[1]["ciphertext"])) == _h(msgs[1]["payload"])
    assert init.complete and resp.complete
    assert init.handshake_hash.hex() == v["handshake_hash"]
    assert resp.handshake_hash.hex() == v["handshake_hash"]
    assert init.split_keys() == resp.split_keys()

    # transport: alternating, initiator first; c1 carries initiator->responder
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    for index, m in enumerate(msgs[2:], start=2):
        sender, receiver = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        ct = sender.encrypt_with_ad(b"", _h(m["payload"]))
        assert ct.hex() == m["ciphertext"]
        assert receiver.decrypt_with_ad(b"", _h(m["ciphertext"])) == _h(m["payload"])


# ---- negative tests ------------------------------------------------------------------------


@pytest.fixture
def keys() -> dict[str, tuple[bytes, bytes]]:
    return {"client": generate_keypair(), "gateway": generate_keypair()}


def _fresh(keys: dict[str, tuple[bytes, bytes]], prologue: bytes = b"jvpn") -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState.initiator(keys["client"][0], keys["gateway"][1], prologue)
    resp = HandshakeState.responder(keys["gateway"][0], prologue)
    return init, resp


def _assert_bad_handshake(exc: pytest.ExceptionInfo[AuthError]) -> None:
    assert exc.value.reason is DropReason.BAD_HANDSHAKE


def test_random_keys_round_trip(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, resp = _fresh(keys)
    assert resp.read_message(init.write_message(b"hello")) == b"hello"
    assert resp.remote_static == keys["client"][1]
    assert init.read_message(resp.write_message(b"welcome")) == b"welcome"
    assert init.handshake_hash == resp.handshake_hash
    assert init.split_keys() == resp.split_keys()
    k1, k2 = init.split_keys()
    assert k1 != k2 and len(k1) == len(k2) == 32


def test_ephemerals_are_fresh(keys: dict[str, tuple[bytes, bytes]]) -> None:
    a, _ = _fresh(keys)
    b, _ = _fresh(keys)
    assert a.write_message()[:32] != b.write_message()[:32]


def test_tampered_msg1_every_byte(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, _ = _fresh(keys)
    msg1 = init.write_message(b"payload")
    for i in range(len(msg1)):
        bad = bytearray(msg1)
        bad[i] ^= 0x01
        _, resp = _fresh(keys)
        with pytest.raises(AuthError) as exc:
            resp.read_message(bytes(bad))
        _assert_bad_handshake(exc)
        assert resp.remote_static is None


def test_tampered_msg2_every_byte_then_genuine_still_accepted(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, resp = _fresh(keys)
    resp.read_message(init.write_message())
    msg2 = resp.write_message(b"ok")
    for i in range(len(msg2)):
        bad = bytearray(msg2)
        bad[i] ^= 0x80
        with pytest.raises(AuthError) as exc:
            init.read_message(bytes(bad))
        _assert_bad_handshake(exc)
        assert not init.complete
    # a forged reply must not poison the initiator: the genuine one still completes it
    assert init.read_message(msg2) == b"ok"
    assert init.handshake_hash == resp.handshake_hash


def test_wrong_responder_key(keys: dict[str, tuple[bytes, bytes]]) -> None:
    _, other_pub = generate_keypair()
    init = HandshakeState.initiator(keys["client"][0], other_pub, b"jvpn")
    resp = HandshakeState.responder(keys["gateway"][0], b"jvpn")
    with pytest.raises(AuthError) as exc:
        resp.read_message(init.write_message(b"x"))
    _assert_bad_handshake(exc)


def test_wrong_initiator_view_of_responder_reply(keys: dict[str, tuple[bytes, bytes]]) -> None:
    # a different gateway key answering: the initiator refuses the reply
    init, resp = _fresh(keys)
    resp.read_message(init.write_message())
    impostor_init, impostor = _fresh({"client": keys["client"], "gateway": generate_keypair()})
    impostor.read_message(impostor_init.write_message())
    with pytest.raises(AuthError):
        init.read_message(impostor.write_message())


def test_prologue_mismatch(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init = HandshakeState.initiator(keys["client"][0], keys["gateway"][1], b"jvpn v1")
    resp = HandshakeState.responder(keys["gateway"][0], b"jvpn v2")
    with pytest.raises(AuthError):
        resp.read_message(init.write_message())


def test_truncated_messages(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, resp = _fresh(keys)
    msg1 = init.write_message(b"abc")
    for n in range(len(msg1)):
        _, r = _fresh(keys)
        with pytest.raises(AuthError) as exc:
            r.read_message(msg1[:n])
        _assert_bad_handshake(exc)
    resp.read_message(msg1)
    msg2 = resp.write_message(b"abc")
    for n in range(len(msg2)):
        with pytest.raises(AuthError):
            init.read_message(msg2[:n])
    assert init.read_message(msg2) == b"abc"


def test_extended_message_rejected(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, resp = _fresh(keys)
    with pytest.raises(AuthError):
        resp.read_message(init.write_message(b"abc") + b"\x00")


def test_oversized_message_rejected(keys: dict[str, tuple[bytes, bytes]]) -> None:
    _, resp = _fresh(keys)
    with pytest.raises(AuthError):
        resp.read_message(bytes(65536))
    init, _ = _fresh(keys)
    with pytest.raises(LocalProtocolError):
        init.write_message(bytes(65535))


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),  # zero
        (1).to_bytes(32, "little"),  # order 1
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    ],
)
def test_low_order_ephemeral_rejected(keys: dict[str, tuple[bytes, bytes]], point: bytes) -> None:
    init, resp = _fresh(keys)
    msg1 = init.write_message()
    with pytest.raises(AuthError) as exc:
        resp.read_message(point + msg1[32:])
    _assert_bad_handshake(exc)


def test_out_of_turn_calls(keys: dict[str, tuple[bytes, bytes]]) -> None:
    init, resp = _fresh(keys)
    with pytest.raises(LocalProtocolError):
        resp.write_message()
    with pytest.raises(LocalProtocolError):
        init.read_message(bytes(48))
    with pytest.raises(LocalProtocolError):
        init.split()
    msg1 = init.write_message()
    with pytest.raises(LocalProtocolError):
        init.write_message()
    resp.read_message(msg1)
    with pytest.raises(LocalProtocolError):
        resp.read_message(msg1)
    init.read_message(resp.write_message())
    with pytest.raises(LocalProtocolError):
        init.write_message()
    with pytest.raises(LocalProtocolError):
        resp.read_message(msg1)


def test_bad_construction_arguments(keys: dict[str, tuple[bytes, bytes]]) -> None:
    with pytest.raises(ValueError):
        HandshakeState.initiator(keys["client"][0], b"short")
    with pytest.raises(ValueError):
        HandshakeState.responder(b"short")
    with pytest.raises(ValueError):
        HandshakeState.responder(keys["gateway"][0], protocol="Noise_XX_25519_ChaChaPoly_BLAKE2s")
    with pytest.raises(ValueError):
        parse_protocol("Noise_IK_448_ChaChaPoly_BLAKE2s")
    with pytest.raises(ValueError):
        public_key(b"\x01" * 31)


def test_keypair_helpers() -> None:
    priv, pub = generate_keypair()
    assert len(priv) == len(pub) == 32
    assert public_key(priv) == pub


# ---- CipherState ----------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_cipherstate_tamper_and_nonce(cipher: str) -> None:
    a, b = CipherState(cipher, b"k" * 32), CipherState(cipher, b"k" * 32)
    ct = a.encrypt_with_ad(b"ad", b"hello")
    with pytest.raises(AuthError) as exc:
        b.decrypt_with_ad(b"ad", ct[:-1] + bytes([ct[-1] ^ 1]))
    assert exc.value.reason is DropReason.BAD_AEAD
    assert b.n == 0  # a failed decrypt does not consume the nonce
    with pytest.raises(AuthError):
        b.decrypt_with_ad(b"other", ct)
    assert b.decrypt_with_ad(b"ad", ct) == b"hello"
    assert a.n == b.n == 1


def test_cipherstate_without_key_is_identity() -> None:
    c = CipherState()
    assert not c.has_key()
    assert c.encrypt_with_ad(b"ad", b"x") == b"x"
    assert c.decrypt_with_ad(b"ad", b"x") == b"x"


def test_cipherstate_nonce_exhaustion() -> None:
    c = CipherState("ChaChaPoly", b"k" * 32)
    c.set_nonce(MAX_NONCE - 1)
    c.encrypt_with_ad(b"", b"last")
    with pytest.raises(LocalProtocolError):
        c.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(LocalProtocolError):
        c.decrypt_with_ad(b"", bytes(17))


def test_cipherstate_rekey_interoperates() -> None:
    a, b = CipherState("ChaChaPoly", b"k" * 32), CipherState("ChaChaPoly", b"k" * 32)
    b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"1"))
    old = a.key
    a.rekey()
    b.rekey()
    assert a.key != old and a.n == b.n == 1
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"2")) == b"2"
