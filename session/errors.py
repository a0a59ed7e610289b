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


class IllegalAdoption(IllegalTransition):
    """The authority's (state, version) cannot be adopted: no such edge, or the version goes back."""

    def __init__(self, state: object, event: object, role: str, known: int, offered: int) -> None:
        who = f"{role} " if role else ""
        after = f"after event {event!s}" if event is not None else "without an event"
        LocalProtocolError.__init__(self, f"{who}session cannot adopt version {offered} {after} "
                                          f"in state {state!s} (it knows version {known})")
        self.state = state
        self.event = event
        self.role = role
        self.known = known
        self.offered = offered


class Rejected(SessionError):
    """A request was refused with an explicit reason code."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)
