"""Noise_IK handshake, written to the Noise Protocol Framework, revision 34.

Pattern (spec section 7.5)::

    IK:
      <- s
      ...
      -> e, es, s, ss
      <- e, ee, se

The initiator (client) pins the responder's (gateway cluster's) static key and
sends its own static key encrypted in the first message; one round trip.
Supported suites: ``Noise_IK_25519_{ChaChaPoly,AESGCM}_{BLAKE2s,BLAKE2b,SHA256,SHA512}``,
all proven by the cacophony test vectors (tests/unit/vectors/noise_ik_cacophony.json).
The names below follow the spec: CipherState, SymmetricState, HandshakeState,
MixKey, MixHash, EncryptAndHash, DecryptAndHash, Split.

Failures while reading are remote errors: ``AuthError(DropReason.BAD_HANDSHAKE)``.
A failed ``read_message`` leaves the state as it was, so a forged reply cannot
kill an initiator that is still waiting for the genuine one.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from session.errors import AuthError, LocalProtocolError, RemoteProtocolError
from session.reasons import DropReason

DEFAULT_PROTOCOL = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
DHLEN = 32
KEY_LEN = 32
TAG_LEN = 16
MAX_MESSAGE_LEN = 65535  # spec section 3
MAX_NONCE = 2**64 - 1  # reserved by the spec (used only by REKEY)

# name -> (constructor, HASHLEN); HMAC takes BLOCKLEN from the hash object itself.
_HASHES: dict[str, tuple[Callable[..., Any], int]] = {
    "BLAKE2s": (hashlib.blake2s, 32),
    "BLAKE2b": (hashlib.blake2b, 64),
    "SHA256": (hashlib.sha256, 32),
    "SHA512": (hashlib.sha512, 64),
}
_CIPHERS = ("ChaChaPoly", "AESGCM")
# 32 zero bits, then n: little-endian for ChaChaPoly, big-endian for AESGCM (spec 12.3, 12.4)
_NONCES = {"ChaChaPoly": struct.Struct("<4xQ"), "AESGCM": struct.Struct(">4xQ")}


@dataclass(frozen=True, slots=True)
class Suite:
    """A parsed protocol name."""

    name: str
    cipher: str
    hash_name: str
    hashlen: int


def parse_protocol(name: str) -> Suite:
    """Parse a supported ``Noise_IK_25519_<cipher>_<hash>`` name; ValueError otherwise."""
    parts = name.split("_")
    if (
        len(parts) != 5
        or parts[0] != "Noise"
        or parts[1] != "IK"
        or parts[2] != "25519"
        or parts[3] not in _CIPHERS
        or parts[4] not in _HASHES
    ):
        raise ValueError(f"unsupported Noise protocol {name!r}")
    return Suite(name, parts[3], parts[4], _HASHES[parts[4]][1])


# ---- DH functions (25519) ---------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private 32 bytes, public 32 bytes)."""
    priv = X25519PrivateKey.generate()
    return priv.private_bytes_raw(), priv.public_key().public_bytes_raw()


def public_key(priv: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    if len(priv) != DHLEN:
        raise ValueError("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw()


def dh(priv: bytes, pub: bytes) -> bytes:
    """X25519 of a 32-byte private key and a peer's public key (AuthError if low order)."""
    if len(priv) != 32 or len(pub) != 32:
        raise AuthError(DropReason.MALFORMED, "X25519 keys must be 32 bytes")
    return _dh(X25519PrivateKey.from_private_bytes(priv), pub)


def _dh(priv: X25519PrivateKey, pub: bytes) -> bytes:
    # cryptography refuses an all-zero shared secret (low-order point): that is
    # the peer's doing, so it surfaces as a handshake failure.
    try:
        return priv.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError:
        raise AuthError(DropReason.BAD_HANDSHAKE, "invalid DH public key") from None


# ---- CipherState (spec section 5.1) ----------------------------------------------------


class CipherState:
    """A key and a nonce counter; encrypts in order, as the spec's CipherState."""

    __slots__ = ("_cipher", "_k", "_aead", "n")

    def __init__(self, cipher: str = "ChaChaPoly", key: bytes | None = None) -> None:
        if cipher not in _CIPHERS:
            raise ValueError(f"unsupported cipher {cipher!r}")
        self._cipher = cipher
        self._k: bytes | None = None
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self.n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """InitializeKey: set the key (None = empty) and reset the nonce."""
        if key is not None and len(key) != KEY_LEN:
            raise ValueError("cipher key must be 32 bytes")
        self._k = key
        self._aead = None
        if key is not None:
            self._aead = ChaCha20Poly1305(key) if self._cipher == "ChaChaPoly" else AESGCM(key)
        self.n = 0

    def has_key(self) -> bool:
        """HasKey."""
        return self._k is not None

    @property
    def key(self) -> bytes | None:
        """The raw key (None when empty)."""
        return self._k

    def set_nonce(self, n: int) -> None:
        """SetNonce."""
        if not 0 <= n <= MAX_NONCE:
            raise ValueError("nonce out of range")
        self.n = n

    def _nonce(self, n: int) -> bytes:
        return _NONCES[self._cipher].pack(n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd: AEAD-encrypt under (k, n) and advance n; identity while no key."""
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("nonce space exhausted: rekey or re-handshake")
        ct = self._aead.encrypt(self._nonce(self.n), plaintext, ad)
        self.n += 1
        return ct

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd: raise AuthError on a bad tag; n advances only on success."""
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("nonce space exhausted: rekey or re-handshake")
        try:
            pt = self._aead.decrypt(self._nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise AuthError(DropReason.BAD_AEAD, "AEAD tag mismatch") from None
        self.n += 1
        return pt

    def rekey(self) -> None:
        """Rekey: k = first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros); n is kept."""
        if self._aead is None:
            raise LocalProtocolError("rekey without a key")
        n = self.n
        self.initialize_key(self._aead.encrypt(self._nonce(MAX_NONCE), bytes(KEY_LEN), b"")[:KEY_LEN])
        self.n = n

    def clone(self) -> CipherState:
        """An independent copy."""
        c = CipherState(self._cipher, self._k)
        c.n = self.n
        return c


# ---- SymmetricState (spec section 5.2) ---------------------------------------------------


class SymmetricState:
    """Chaining key, handshake hash and the handshake CipherState."""

    __slots__ = ("suite", "_hash", "ck", "h", "cs")

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self._hash = _HASHES[suite.hash_name][0]
        name = suite.name.encode("ascii")
        if len(name) <= suite.hashlen:
            self.h = name.ljust(suite.hashlen, b"\x00")
        else:
            self.h = self._hash(name).digest()
        self.ck = self.h
        self.cs = CipherState(suite.cipher)

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self._hash)

    def hkdf(self, chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
        """HKDF of spec section 4.3 (two or three outputs of HASHLEN bytes)."""
        temp_key = self._hmac(chaining_key, ikm)
        out1 = self._hmac(temp_key, b"\x01")
        out2 = self._hmac(temp_key, out1 + b"\x02")
        if num_outputs == 2:
            return out1, out2
        return out1, out2, self._hmac(temp_key, out2 + b"\x03")

    def mix_key(self, ikm: bytes) -> None:
        """MixKey."""
        self.ck, temp_k = self.hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k[:KEY_LEN])  # truncate when HASHLEN is 64

    def mix_hash(self, data: bytes) -> None:
        """MixHash."""
        self.h = self._hash(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash."""
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash."""
        pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split_keys(self) -> tuple[bytes, bytes]:
        """The two raw transport keys of Split (initiator->responder, responder->initiator)."""
        k1, k2 = self.hkdf(self.ck, b"", 2)
        return k1[:KEY_LEN], k2[:KEY_LEN]

    def clone(self) -> SymmetricState:
        """An independent copy (to roll back a failed read)."""
        c = SymmetricState.__new__(SymmetricState)
        c.suite, c._hash, c.ck, c.h, c.cs = self.suite, self._hash, self.ck, self.h, self.cs.clone()
        return c


# ---- HandshakeState (spec section 5.3), pattern IK ----------------------------------------


class HandshakeState:
    """One side of a Noise_IK handshake: two messages, then split()."""

    def __init__(
        self,
        *,
        initiator: bool,
        s_priv: bytes,
        rs_pub: bytes | None,
        prologue: bytes,
        e_priv: bytes | None,
        protocol: str,
    ) -> None:
        suite = parse_protocol(protocol)
        if len(s_priv) != DHLEN:
            raise ValueError("static private key must be 32 bytes")
        if e_priv is not None and len(e_priv) != DHLEN:
            raise ValueError("ephemeral private key must be 32 bytes")
        if initiator and (rs_pub is None or len(rs_pub) != DHLEN):
            raise ValueError("initiator needs the responder's 32-byte static public key")
        self._initiator = initiator
        self._s = X25519PrivateKey.from_private_bytes(s_priv)
        self._s_pub = self._s.public_key().public_bytes_raw()
        self._e_fixed = e_priv  # test vectors fix the ephemeral; real use draws a fresh one
        self._e: X25519PrivateKey | None = None
        self._rs = rs_pub
        self._re: bytes | None = None
        self._step = 0  # messages processed so far; IK has two
        self._keys: tuple[bytes, bytes] | None = None
        self._ss = SymmetricState(suite)
        self._ss.mix_hash(prologue)
        # pre-message "<- s": both sides hash the responder's static key
        self._ss.mix_hash(rs_pub if initiator and rs_pub is not None else self._s_pub)

    @classmethod
    def initiator(
        cls,
        s_priv: bytes,
        rs_pub: bytes,
        prologue: bytes = b"",
        e_priv: bytes | None = None,
        protocol: str = DEFAULT_PROTOCOL,
    ) -> HandshakeState:
        """The client side, pinning the responder's static public key."""
        return cls(initiator=True, s_priv=s_priv, rs_pub=rs_pub, prologue=prologue,
                   e_priv=e_priv, protocol=protocol)

    @classmethod
    def responder(
        cls,
        s_priv: bytes,
        prologue: bytes = b"",
        e_priv: bytes | None = None,
        protocol: str = DEFAULT_PROTOCOL,
    ) -> HandshakeState:
        """The gateway side; learns the initiator's static key from message 1."""
        return cls(initiator=False, s_priv=s_priv, rs_pub=None, prologue=prologue,
                   e_priv=e_priv, protocol=protocol)

    # -- state --------------------------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        """True for the side that sends the first message."""
        return self._initiator

    @property
    def protocol(self) -> str:
        """The full protocol name."""
        return self._ss.suite.name

    @property
    def local_static(self) -> bytes:
        """Our static public key."""
        return self._s_pub

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key (responder: known after message 1)."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """GetHandshakeHash: h, final once the handshake is complete (channel binding)."""
        return self._ss.h

    @property
    def complete(self) -> bool:
        """Both messages have been processed."""
        return self._step == 2

    @property
    def expects_write(self) -> bool:
        """It is our turn to write a message."""
        return (self._step == 0 and self._initiator) or (self._step == 1 and not self._initiator)

    def split_keys(self) -> tuple[bytes, bytes]:
        """Raw Split() keys (initiator->responder, responder->initiator)."""
        if self._keys is None:
            raise LocalProtocolError("split before the handshake is complete")
        return self._keys

    def split(self) -> tuple[CipherState, CipherState]:
        """Split(): (c1 initiator->responder, c2 responder->initiator), fresh nonces."""
        k1, k2 = self.split_keys()
        cipher = self._ss.suite.cipher
        return CipherState(cipher, k1), CipherState(cipher, k2)

    # -- messages -----------------------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce our next handshake message carrying ``payload``."""
        if not self.expects_write:
            raise LocalProtocolError(f"write_message out of turn (step {self._step})")
        ss = self._ss
        self._e = (
            X25519PrivateKey.from_private_bytes(self._e_fixed)
            if self._e_fixed is not None
            else X25519PrivateKey.generate()
        )
        e_pub = self._e.public_key().public_bytes_raw()
        ss.mix_hash(e_pub)  # "e" (no PSK, so no MixKey on e)
        if self._initiator:
            assert self._rs is not None
            ss.mix_key(_dh(self._e, self._rs))  # es
            enc_s = ss.encrypt_and_hash(self._s_pub)  # s
            ss.mix_key(_dh(self._s, self._rs))  # ss
            out = e_pub + enc_s + ss.encrypt_and_hash(payload)
        else:
            assert self._re is not None and self._rs is not None
            ss.mix_key(_dh(self._e, self._re))  # ee
            ss.mix_key(_dh(self._e, self._rs))  # se
            out = e_pub + ss.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(f"handshake message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        self._advance()
        return out

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's handshake message; return its payload or raise AuthError."""
        if self.expects_write or self.complete:
            raise LocalProtocolError(f"read_message out of turn (step {self._step})")
        message = bytes(message)
        work = self._ss.clone()  # commit only on success
        try:
            if not self._initiator:
                rs, payload = self._read_first(work, message)
            else:
                rs, payload = self._read_second(work, message)
        except RemoteProtocolError as exc:
            raise AuthError(DropReason.BAD_HANDSHAKE, exc.detail or exc.reason.name) from None
        self._ss = work
        self._rs = rs
        self._advance()
        return payload

    def _read_first(self, ss: SymmetricState, msg: bytes) -> tuple[bytes, bytes]:
        # -> e, es, s, ss
        if len(msg) > MAX_MESSAGE_LEN or len(msg) < DHLEN + DHLEN + TAG_LEN + TAG_LEN:
            raise AuthError(DropReason.BAD_HANDSHAKE, f"message 1 of {len(msg)} bytes")
        re = msg[:DHLEN]
        ss.mix_hash(re)
        ss.mix_key(_dh(self._s, re))
        rs = ss.decrypt_and_hash(msg[DHLEN:DHLEN + DHLEN + TAG_LEN])
        ss.mix_key(_dh(self._s, rs))
        payload = ss.decrypt_and_hash(msg[DHLEN + DHLEN + TAG_LEN:])
        self._re = re
        return rs, payload

    def _read_second(self, ss: SymmetricState, msg: bytes) -> tuple[bytes, bytes]:
        # <- e, ee, se
        if len(msg) > MAX_MESSAGE_LEN or len(msg) < DHLEN + TAG_LEN:
            raise AuthError(DropReason.BAD_HANDSHAKE, f"message 2 of {len(msg)} bytes")
        assert self._e is not None and self._rs is not None
        re = msg[:DHLEN]
        ss.mix_hash(re)
        ss.mix_key(_dh(self._e, re))  # ee
        ss.mix_key(_dh(self._s, re))  # se
        payload = ss.decrypt_and_hash(msg[DHLEN:])
        self._re = re
        return self._rs, payload

    def _advance(self) -> None:
        self._step += 1
        if self._step == 2:
            self._keys = self._ss.split_keys()
            self._e = None  # forward secrecy: drop the ephemeral as soon as it is spent
            self._e_fixed = None
