"""Exceptions of the pure core: one base class, every error carries a code."""

from __future__ import annotations

from session.reasons import DropReason, RejectReason


class SessionError(Exception):
    """Base class of every error raised by ``session``."""


class LocalProtocolError(SessionError):
    """Our own side misused the API (a programming error, not the peer's fault)."""


class RemoteProtocolError(SessionError):
    """The peer sent something we must not accept."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)


class DecodeError(RemoteProtocolError):
    """A message failed strict decoding (malformed, truncated, oversized, unknown)."""


class AuthError(RemoteProtocolError):
    """A message failed authentication (AEAD tag, MAC, handshake)."""


class ReplayError(RemoteProtocolError):
    """A message was already seen or is older than the replay window."""


class IllegalTransition(LocalProtocolError):
    """The transition table has no entry for (state, event)."""

    def __init__(self, state: object, event: object, role: str = "") -> None:
        self.state = state
        self.event = event
        self.role = role
        who = f"{role} " if role else ""
        super().__init__(f"{who}session cannot handle event {event!s} in state {state!s}")


class Rejected(SessionError):
    """A request was refused with an explicit reason code."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)
