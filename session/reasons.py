"""Reason codes. Wire values are IntEnums and never change meaning once shipped."""

from __future__ import annotations

from enum import IntEnum


class RejectReason(IntEnum):
    """Why a gateway refused a handshake or a reattach (docs/ARCHITECTURE.md, Reattach)."""

    UNKNOWN_SESSION = 1
    EXPIRED = 2
    TERMINATED = 3
    BAD_PROOF = 4
    REPLAYED_NONCE = 5
    STALE_VERSION = 6
    DUAL_ACTIVE_CONFLICT = 7
    POLICY_DENIED = 8
    RATE_LIMITED = 9
    STORE_UNAVAILABLE = 10
    CLOCK_SKEW = 11  # proof timestamp outside the accepted window
    UNKNOWN_CLIENT = 12  # handshake from a key not in the registry
    BAD_HANDSHAKE = 13
    OVERLOADED = 14
    ADDRESS_POOL_EXHAUSTED = 15  # an L3 session asked for, no inner address left to give


class TerminateReason(IntEnum):
    """Why a session ended (kept in its tombstone)."""

    CLIENT_CLOSE = 1
    EXPIRED = 2
    ADMIN = 3
    POLICY_REVOKED = 4
    SECURITY = 5
    HANDSHAKE_FAILED = 6


class DropReason(IntEnum):
    """Why an incoming datagram or frame was dropped (counted, never fatal)."""

    TRUNCATED = 1
    OVERSIZED = 2
    BAD_VERSION = 3
    UNKNOWN_TYPE = 4
    MALFORMED = 5
    BAD_AEAD = 6
    REPLAYED = 7
    STALE_EPOCH = 8
    UNKNOWN_SESSION = 9
    BAD_MAC = 10
    BAD_HANDSHAKE = 11
    NOT_VALIDATED = 12
    RATE_LIMITED = 13
    UNEXPECTED = 14
    POLICY = 15
    QUEUE_FULL = 16
    LEASE_EXPIRED = 17  # this node could not confirm its bindings with the store in time
    TCP_LIMIT = 18  # a TCP connection refused or closed by a limit (caps, timeouts, a stalled peer)
    UNTRUSTED_PREFIX = 19  # a client-address prefix (or PROXY header) from a non-balancer source
    MISSING_PREFIX = 20  # from a trusted balancer without a valid client-address prefix
    KEYS_EXPIRED = 21  # data under a session secret older than its reject-after age: rekey first
    QUIC_LIMIT = 22  # a QUIC datagram or connection refused by a limit (caps, deadlines, no ALPN)
    SPOOFED_SOURCE = 23  # an L3 packet whose inner source is not its session's address
    SUPERSEDED = 24  # a reattach request older than one its session already sent here


class NoticeKind(IntEnum):
    """Authenticated gateway-to-client control notices outside a data channel."""

    TERMINATED = 1  # the session is over: re-handshake
    NOT_BOUND_HERE = 2  # this node does not hold the binding: reattach
