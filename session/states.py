"""The session state machine: everything that affects transitions lives here.

Theory of operation. A session is born (BIRTH) by a completed handshake and is
ATTACHED while a validated transport carries it. Path quality moves it between
ATTACHED, VOLATILE and DEGRADED; losing the transport moves it to RECOVERING,
from which a successful reattach returns it to ATTACHED (or, when the gateway
had only heard silence and the same binding speaks again, TRANSPORT_RESTORED
does). TERMINATED is terminal
and keeps a reason. Every applied transition increments ``state_version``.

This table is the single source of truth: the store's Lua scripts are given
the same table (``lua_transition_table``), so client, gateway and store agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from session.errors import IllegalTransition


class SessionState(IntEnum):
    BIRTH = 0
    ATTACHED = 1
    VOLATILE = 2
    DEGRADED = 3
    RECOVERING = 4
    TERMINATED = 5


class SessionEvent(IntEnum):
    HANDSHAKE_COMPLETE = 1
    QUALITY_VOLATILE = 2
    QUALITY_DEGRADED = 3
    QUALITY_RECOVERED = 4
    TRANSPORT_LOST = 5
    REATTACH = 6
    TERMINATE = 7
    EXPIRE = 8
    TRANSPORT_RESTORED = 9  # the silent binding carries authenticated traffic again


S = SessionState
E = SessionEvent
_LIVE = (S.ATTACHED, S.VOLATILE, S.DEGRADED)

TRANSITIONS: dict[SessionState, dict[SessionEvent, SessionState]] = {
    S.BIRTH: {
        E.HANDSHAKE_COMPLETE: S.ATTACHED,
        E.TERMINATE: S.TERMINATED,
        E.EXPIRE: S.TERMINATED,
    },
    S.ATTACHED: {
        E.QUALITY_VOLATILE: S.VOLATILE,
        E.QUALITY_DEGRADED: S.DEGRADED,
        E.TRANSPORT_LOST: S.RECOVERING,
        E.REATTACH: S.ATTACHED,
        E.TERMINATE: S.TERMINATED,
        E.EXPIRE: S.TERMINATED,
    },
    S.VOLATILE: {
        E.QUALITY_DEGRADED: S.DEGRADED,
        E.QUALITY_RECOVERED: S.ATTACHED,
        E.TRANSPORT_LOST: S.RECOVERING,
        E.REATTACH: S.ATTACHED,
        E.TERMINATE: S.TERMINATED,
        E.EXPIRE: S.TERMINATED,
    },
    S.DEGRADED: {
        E.QUALITY_VOLATILE: S.VOLATILE,
        E.QUALITY_RECOVERED: S.ATTACHED,
        E.TRANSPORT_LOST: S.RECOVERING,
        E.REATTACH: S.ATTACHED,
        E.TERMINATE: S.TERMINATED,
        E.EXPIRE: S.TERMINATED,
    },
    S.RECOVERING: {
        E.REATTACH: S.ATTACHED,
        E.TRANSPORT_RESTORED: S.ATTACHED,
        E.TERMINATE: S.TERMINATED,
        E.EXPIRE: S.TERMINATED,
    },
    S.TERMINATED: {},
}

LIVE_STATES = frozenset(_LIVE)


def next_state(state: SessionState, event: SessionEvent, role: str = "") -> SessionState:
    """Return the state after ``event``; raise IllegalTransition if the table has none."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state.name, event.name, role) from None


def is_allowed(state: SessionState, event: SessionEvent) -> bool:
    """Whether the table has an entry for (state, event)."""
    return event in TRANSITIONS[state]


@dataclass
class StateMachine:
    """A session's state and version; ``apply`` is the only way to change them."""

    state: SessionState = SessionState.BIRTH
    version: int = 0
    role: str = ""
    terminate_reason: int | None = None

    def apply(self, event: SessionEvent, reason: int | None = None) -> SessionState:
        """Apply ``event`` (raises IllegalTransition) and bump the version."""
        self.state = next_state(self.state, event, self.role)
        self.version += 1
        if self.state is SessionState.TERMINATED:
            self.terminate_reason = reason
        return self.state

    def adopt(self, state: SessionState, version: int) -> None:
        """Take the authoritative (state, version) the gateway reported."""
        self.state = state
        self.version = version


def lua_transition_table() -> str:
    """The transition table as a Lua table literal, for the store's scripts."""
    rows = []
    for state, edges in TRANSITIONS.items():
        cells = ", ".join(f"[{int(ev)}] = {int(to)}" for ev, to in edges.items())
        rows.append(f"  [{int(state)}] = {{{cells}}}")
    return "local TRANSITIONS = {\n" + ",\n".join(rows) + "\n}\n"
