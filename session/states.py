"""The session state machine: everything that affects transitions lives here.

Theory of operation. A session is born (BIRTH) by a completed handshake and is
ATTACHED while a validated transport carries it. Path quality moves it between
ATTACHED, VOLATILE and DEGRADED; losing the transport moves it to RECOVERING,
from which a successful reattach returns it to ATTACHED (or, when the gateway
had only heard silence and the same binding speaks again, TRANSPORT_RESTORED
does). TERMINATED is terminal
and keeps a reason. Every applied transition increments ``state_version``.

A ``StateMachine`` is the only way a session's state changes, on either side.
The authority (the gateway and its store) ``apply``s an event and counts a
version. A client's copy is not authoritative: its own events (quality,
transport lost, close) change its state but not the version, which it only
learns from the gateway. It ``adopt``s the gateway's (state, version) from an
authenticated answer: legal only along an edge of the table (or, with no
event, keeping its state) and only forwards in version, so a stale or
replayed answer can never move a client back.

This table is the single source of truth: the store's Lua scripts are given
the same table (``lua_transition_table``), so client, gateway and store agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from session.errors import IllegalAdoption, IllegalTransition


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

# The event that moves a live session to the quality grade a path's figures call for:
# the client applies it when it grades its path, the gateway when the client reports it.
QUALITY_EVENTS: dict[SessionState, SessionEvent] = {
    S.ATTACHED: E.QUALITY_RECOVERED,
    S.VOLATILE: E.QUALITY_VOLATILE,
    S.DEGRADED: E.QUALITY_DEGRADED,
}


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
    """A session's state and version; ``apply`` and ``adopt`` are the only ways to change them."""

    state: SessionState = SessionState.BIRTH
    version: int = 0
    role: str = ""
    authoritative: bool = True  # counts versions (gateway, store); a client only learns them
    terminate_reason: int | None = None

    def apply(self, event: SessionEvent, reason: int | None = None) -> SessionState:
        """Apply ``event`` (raises IllegalTransition); the authority also bumps the version."""
        self.state = next_state(self.state, event, self.role)
        if self.authoritative:
            self.version += 1
        if self.state is SessionState.TERMINATED:
            self.terminate_reason = reason
        return self.state

    def adopt(self, version: int, event: SessionEvent | None = None) -> SessionState:
        """Take the authority's (state, version): the state after ``event`` (None: ours).

        Legal when the table has the edge (state, event) and the version moves
        forwards: strictly after an event (the authority counted it), or not
        backwards when only the version is learnt. Raises IllegalAdoption
        otherwise, and changes nothing.
        """
        state = self.state if event is None else TRANSITIONS[self.state].get(event)
        if state is None or version < self.version or (event is not None and version == self.version):
            raise IllegalAdoption(self.state.name, event.name if event else None,
                                  self.role, self.version, version)
        self.state = state
        self.version = version
        return state

    def resync(self, state: SessionState, version: int) -> SessionState:
        """Take the authority's (state, version) when it moved on without this copy seeing
        the events (a refused CAS carries the current record). Only forwards: raises
        IllegalAdoption for a version not newer than ours, and changes nothing."""
        if version <= self.version:
            raise IllegalAdoption(self.state.name, None, self.role, self.version, version)
        self.state = state
        self.version = version
        return state


def lua_transition_table() -> str:
    """The transition table as a Lua table literal, for the store's scripts."""
    rows = []
    for state, edges in TRANSITIONS.items():
        cells = ", ".join(f"[{int(ev)}] = {int(to)}" for ev, to in edges.items())
        rows.append(f"  [{int(state)}] = {{{cells}}}")
    return "local TRANSITIONS = {\n" + ",\n".join(rows) + "\n}\n"
