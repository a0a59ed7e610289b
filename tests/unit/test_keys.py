"""Key schedule, MACs and KEK wrapping."""

from __future__ import annotations

import base64
import hashlib

import pytest

from session.errors import AuthError
from session.keys import (
    SESSION_SECRET_LEN,
    WRAP_FORMAT_V1,
    WRAP_FORMAT_V2,
    WRAP_FORMAT_V3,
    WRAPPED_SECRET_LEN,
    WRAPPED_SECRET_LEN_V2,
    KekRing,
    SessionKeys,
    derive_session_secret,
    kek_id,
    load_kek,
    mac,
    policy_binding,
    registry_key,
    traffic_keys,
    unwrap_secret,
    verify_mac,
    wrap_format,
    wrap_secret,
)
from session.noise import HandshakeState, generate_keypair

K1, K2, HH = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
SECRET = bytes(range(32))
SID = b"S" * 16
KEK = b"K" * 32


def test_session_secret_from_a_real_handshake() -> None:
    (cs, _), (gs, gp) = generate_keypair(), generate_keypair()
    init, resp = HandshakeState.initiator(cs, gp), HandshakeState.responder(gs)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    a = derive_session_secret(*init.split_keys(), init.handshake_hash)
    b = derive_session_secret(*resp.split_keys(), resp.handshake_hash)
    assert a == b and len(a) == SESSION_SECRET_LEN


def test_session_secret_depends_on_every_input() -> None:
    base = derive_session_secret(K1, K2, HH)
    assert base == derive_session_secret(K1, K2, HH)
    assert base != derive_session_secret(K2, K1, HH)
    assert base != derive_session_secret(K1, K2, b"\x04" * 32)
    assert base != derive_session_secret(K1, K2, HH + HH)
    for bad in [(K1[:31], K2, HH), (K1, K2 + b"x", HH), (K1, K2, b"short")]:
        with pytest.raises(ValueError):
            derive_session_secret(*bad)


def test_session_keys_differ_per_direction() -> None:
    keys = SessionKeys(SECRET)
    assert len(keys.proof_key) == len(keys.control_key) == 32
    assert keys.proof_key != keys.control_key
    assert SECRET not in (keys.proof_key, keys.control_key)
    assert SessionKeys(SECRET).proof_key == keys.proof_key
    assert SessionKeys(bytes(32)).proof_key != keys.proof_key
    assert keys.proof_key.hex() not in repr(keys)
    with pytest.raises(ValueError):
        SessionKeys(b"short")


def test_mac_is_keyed_blake2s() -> None:
    key = SessionKeys(SECRET).proof_key
    tag = mac(key, b"data")
    assert tag == hashlib.blake2s(b"data", key=key, digest_size=32).digest()
    assert verify_mac(key, b"data", tag)
    assert not verify_mac(key, b"datA", tag)
    assert not verify_mac(SessionKeys(SECRET).control_key, b"data", tag)
    assert not verify_mac(key, b"data", tag[:-1])
    assert not verify_mac(key, b"data", b"")
    assert not verify_mac(key, b"data", bytes([tag[0] ^ 1]) + tag[1:])
    with pytest.raises(ValueError):
        mac(b"short", b"data")


def test_traffic_keys_distinct() -> None:
    c2g, g2c = traffic_keys(SECRET, 1, b"B" * 16, b"node-a")
    assert len(c2g) == len(g2c) == 32 and c2g != g2c
    seen = {c2g, g2c}
    for args in [
        (SECRET, 2, b"B" * 16, b"node-a"),
        (SECRET, 1, b"C" * 16, b"node-a"),
        (SECRET, 1, b"B" * 16, b"node-b"),
        (SECRET, 1, b"B" * 16, b""),
        (bytes(32), 1, b"B" * 16, b"node-a"),
    ]:
        pair = traffic_keys(*args)
        assert not seen & set(pair), args
        seen |= set(pair)
    assert traffic_keys(SECRET, 1, b"B" * 16, b"node-a") == (c2g, g2c)


def test_traffic_keys_encoding_is_unambiguous() -> None:
    # the same concatenated bytes split differently must not collide
    assert traffic_keys(SECRET, 1, b"ab", b"c") != traffic_keys(SECRET, 1, b"a", b"bc")
    assert traffic_keys(SECRET, 256, b"a", b"") != traffic_keys(SECRET, 1, b"\x00a", b"")


@pytest.mark.parametrize(
    "args",
    [
        (b"short", 1, b"B", b"n"),
        (SECRET, -1, b"B", b"n"),
        (SECRET, 2**64, b"B", b"n"),
        (SECRET, 1, b"", b"n"),
        (SECRET, 1, b"B" * 256, b"n"),
        (SECRET, 1, b"B", b"n" * 256),
    ],
)
def test_traffic_keys_validation(args: tuple[bytes, int, bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        traffic_keys(*args)


POLICY = policy_binding("ab" * 32, "10.0.0.1:53", 300_000, 30, 0b110, 86_400_000)


def test_wrap_round_trip() -> None:
    blob = wrap_secret(KEK, SECRET, SID, policy=POLICY)
    assert len(blob) == WRAPPED_SECRET_LEN
    assert wrap_format(blob) == WRAP_FORMAT_V3
    assert SECRET not in blob
    assert unwrap_secret(KEK, blob, SID, policy=POLICY) == SECRET
    assert wrap_secret(KEK, SECRET, SID, policy=POLICY) != blob  # random nonce


def test_wrap_with_explicit_nonce_is_deterministic() -> None:
    nonce = b"N" * 12
    blob = wrap_secret(KEK, SECRET, SID, policy=POLICY, nonce=nonce)
    assert blob == wrap_secret(KEK, SECRET, SID, policy=POLICY, nonce=nonce)
    assert blob[4:16] == nonce
    with pytest.raises(ValueError):
        wrap_secret(KEK, SECRET, SID, policy=POLICY, nonce=b"short")


def test_unwrap_rejects_every_tampering() -> None:
    blob = wrap_secret(KEK, SECRET, SID, policy=POLICY)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(AuthError):
            unwrap_secret(KEK, bytes(bad), SID, policy=POLICY)
    with pytest.raises(AuthError):
        unwrap_secret(KEK, blob, b"T" * 16, policy=POLICY)
    with pytest.raises(AuthError):
        unwrap_secret(b"L" * 32, blob, SID, policy=POLICY)
    for n in (0, 1, len(blob) - 1):
        with pytest.raises(AuthError):
            unwrap_secret(KEK, blob[:n], SID, policy=POLICY)
    with pytest.raises(AuthError):
        unwrap_secret(KEK, blob + b"\x00", SID, policy=POLICY)
    with pytest.raises(AuthError):
        wrap_format(b"")


@pytest.mark.parametrize("field", range(6))
def test_unwrap_refuses_a_changed_policy_field(field: int) -> None:
    """A store writer who changes one policy field of a record (client id, upstream, ttl,
    reattach rate, transports, max age) leaves a secret that no longer unwraps."""
    fields: list[object] = ["ab" * 32, "10.0.0.1:53", 300_000, 30, 0b110, 86_400_000]
    blob = wrap_secret(KEK, SECRET, SID, policy=policy_binding(*fields))  # type: ignore[arg-type]
    changed = list(fields)
    changed[field] = "127.0.0.1:4444" if isinstance(fields[field], str) else 1 << 20
    with pytest.raises(AuthError, match="policy fields"):
        unwrap_secret(KEK, blob, SID, policy=policy_binding(*changed))  # type: ignore[arg-type]


def test_policy_binding_is_unambiguous() -> None:
    assert policy_binding("a", "bc", 1, 2, 3, 4) != policy_binding("ab", "c", 1, 2, 3, 4)
    assert policy_binding("a", "b", 12, 3, 4, 5) != policy_binding("a", "b", 1, 23, 4, 5)
    assert policy_binding("a", "b", 1, 2, 34, 5) != policy_binding("a", "b", 1, 2, 3, 45)
    policy_binding("\ud800", "x" * 70_000, -1, 2**70, 0, -5)  # never raises on what a record holds


def test_max_age_is_bound_and_cannot_be_stripped_or_added() -> None:
    """The record's maximum age (``ma``) is in the AEAD associated data: raising it, removing
    it (a record without ``ma`` binds five fields), or adding one to a record born before
    maximum ages leaves a secret that does not unwrap; an old record still unwraps as it was."""
    fields = ("ab" * 32, "10.0.0.1:53", 300_000, 30, 0b110)
    blob = wrap_secret(KEK, SECRET, SID, policy=policy_binding(*fields, 86_400_000))
    assert unwrap_secret(KEK, blob, SID, policy=policy_binding(*fields, 86_400_000)) == SECRET
    for other in (86_400_001, 10**12, None):
        with pytest.raises(AuthError, match="policy fields"):
            unwrap_secret(KEK, blob, SID, policy=policy_binding(*fields, other))
    old = wrap_secret(KEK, SECRET, SID, policy=policy_binding(*fields, None))
    assert unwrap_secret(KEK, old, SID, policy=policy_binding(*fields, None)) == SECRET
    with pytest.raises(AuthError, match="policy fields"):
        unwrap_secret(KEK, old, SID, policy=policy_binding(*fields, 86_400_000))


def test_old_format_is_refused() -> None:
    """Format 1 (no policy bound) is no longer read: such a session's client handshakes again."""
    blob = bytearray(wrap_secret(KEK, SECRET, SID, policy=POLICY))
    blob[0] = WRAP_FORMAT_V1
    with pytest.raises(AuthError, match="unknown wrap format 1"):
        unwrap_secret(KEK, bytes(blob), SID, policy=POLICY)


def test_registry_key_is_its_own() -> None:
    k = registry_key(KEK)
    assert len(k) == 32 and k != KEK and k != registry_key(b"L" * 32)
    with pytest.raises(ValueError):
        registry_key(b"short")


def test_wrap_validation() -> None:
    with pytest.raises(ValueError):
        wrap_secret(b"short", SECRET, SID, policy=POLICY)
    with pytest.raises(ValueError):
        wrap_secret(KEK, b"short", SID, policy=POLICY)
    with pytest.raises(ValueError):
        wrap_secret(KEK, SECRET, SID, policy=b"not a binding")
    with pytest.raises(ValueError):
        unwrap_secret(b"short", bytes(WRAPPED_SECRET_LEN), SID, policy=POLICY)


def test_load_kek_formats() -> None:
    raw = bytes(range(100, 132))
    assert load_kek(raw) == raw
    assert load_kek(raw.hex()) == raw
    assert load_kek(raw.hex().upper()) == raw
    assert load_kek(raw.hex().encode()) == raw
    assert load_kek("  " + raw.hex() + "\n") == raw
    assert load_kek(base64.b64encode(raw).decode()) == raw
    assert load_kek(base64.b64encode(raw)) == raw
    assert load_kek(base64.urlsafe_b64encode(b"\xff" * 32).decode()) == b"\xff" * 32
    assert load_kek(base64.b64encode(raw).decode() + "\n") == raw


@pytest.mark.parametrize(
    "value",
    [
        b"",
        "",
        b"\x00" * 31,
        b"\x00" * 33,
        "ab" * 31,
        "zz" * 32,
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        "not a key at all!",
        b"\xff\xfe" * 20,
    ],
)
def test_load_kek_rejects(value: str | bytes) -> None:
    with pytest.raises(ValueError) as exc:
        load_kek(value)
    assert "32" in str(exc.value)
    if value and isinstance(value, str):
        assert value not in str(exc.value)  # never echo key material


# ---- KEK rotation: format 3 (KEK id in the header), keyrings --------------------------------

OLD, NEW = b"O" * 32, b"N" * 32


def test_format_3_carries_the_kek_id_in_its_authenticated_header() -> None:
    blob = wrap_secret(NEW, SECRET, SID, policy=POLICY)
    assert len(blob) == WRAPPED_SECRET_LEN == 1 + 3 + 12 + 32 + 16 == 64  # listpack's limit
    assert blob[0] == WRAP_FORMAT_V3 and blob[1:4] == kek_id(NEW)
    assert kek_id(NEW) != kek_id(OLD) and len(kek_id(NEW)) == 3
    assert kek_id(NEW) not in (NEW[:3], hashlib.blake2s(NEW).digest()[:3])  # its own hash
    assert unwrap_secret(NEW, blob, SID, policy=POLICY) == SECRET
    assert unwrap_secret(KekRing(NEW, [OLD]), blob, SID, policy=POLICY) == SECRET
    # the id is in the AD: another KEK's id written over it (with that KEK in the ring) fails
    forged = blob[:1] + kek_id(OLD) + blob[4:]
    with pytest.raises(AuthError, match="another KEK"):
        unwrap_secret(KekRing(NEW, [OLD]), forged, SID, policy=POLICY)


def test_a_ring_picks_the_kek_by_id() -> None:
    """Only the KEK named by the id is tried (the others would fail anyway): a ring whose
    KEK of that id is missing refuses the blob without trying the rest."""
    blob = wrap_secret(OLD, SECRET, SID, policy=POLICY)
    ring = KekRing(NEW, [b"X" * 32, OLD, b"Y" * 32])
    assert ring.with_id(blob[1:4]) == (OLD,)
    assert unwrap_secret(ring, blob, SID, policy=POLICY) == SECRET


def test_a_previous_kek_unwraps_and_the_current_one_wraps() -> None:
    ring = KekRing(NEW, [OLD])
    assert ring.current == NEW and ring.all == (NEW, OLD)
    born_before = wrap_secret(OLD, SECRET, SID, policy=POLICY)
    assert unwrap_secret(ring, born_before, SID, policy=POLICY) == SECRET
    # and the other order (the first step of a rolling rotation: kek = old, previous = [new])
    born_after = wrap_secret(NEW, SECRET, SID, policy=POLICY)
    assert unwrap_secret(KekRing(OLD, [NEW]), born_after, SID, policy=POLICY) == SECRET
    assert ring.registry_keys() == (registry_key(NEW), registry_key(OLD))
    assert KekRing(NEW, [OLD, NEW, OLD]).previous == (OLD,)  # no duplicates, not the current
    assert "N" not in repr(ring) and "O" * 4 not in repr(ring)


def test_a_kek_not_in_the_ring_is_refused() -> None:
    blob = wrap_secret(OLD, SECRET, SID, policy=POLICY)
    with pytest.raises(AuthError, match="unknown KEK"):
        unwrap_secret(KekRing(NEW), blob, SID, policy=POLICY)
    with pytest.raises(AuthError, match="unknown KEK"):
        unwrap_secret(NEW, blob, SID, policy=POLICY)
    with pytest.raises(ValueError):
        KekRing(NEW, [b"short"])


def test_format_2_blobs_are_still_read_with_every_kek_of_the_ring() -> None:
    """Format 2 (no KEK id) is what live sessions held before format 3: still readable,
    by trying each KEK of the ring; still bound to its policy and session id."""
    v2 = wrap_secret(OLD, SECRET, SID, policy=POLICY, fmt=WRAP_FORMAT_V2)
    assert len(v2) == WRAPPED_SECRET_LEN_V2 and v2[0] == WRAP_FORMAT_V2
    assert unwrap_secret(OLD, v2, SID, policy=POLICY) == SECRET
    assert unwrap_secret(KekRing(NEW, [OLD]), v2, SID, policy=POLICY) == SECRET
    assert unwrap_secret(KekRing(OLD, [NEW]), v2, SID, policy=POLICY) == SECRET
    with pytest.raises(AuthError, match="another KEK"):
        unwrap_secret(KekRing(NEW), v2, SID, policy=POLICY)
    with pytest.raises(AuthError, match="policy fields"):
        unwrap_secret(KekRing(NEW, [OLD]), v2, b"T" * 16, policy=POLICY)
    with pytest.raises(AuthError):  # a format-2 blob relabelled 3 (or 3 relabelled 2)
        unwrap_secret(OLD, bytes([WRAP_FORMAT_V3]) + v2[1:], SID, policy=POLICY)
    v3 = wrap_secret(OLD, SECRET, SID, policy=POLICY)
    with pytest.raises(AuthError):
        unwrap_secret(OLD, bytes([WRAP_FORMAT_V2]) + v3[1:], SID, policy=POLICY)
    with pytest.raises(ValueError):
        wrap_secret(OLD, SECRET, SID, policy=POLICY, fmt=WRAP_FORMAT_V1)
