"""The transition table: legal edges, illegal ones raise naming state and event."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from session.errors import IllegalTransition
from session.states import (
    LIVE_STATES,
    TRANSITIONS,
    SessionEvent,
    SessionState,
    StateMachine,
    is_allowed,
    lua_transition_table,
    next_state,
)


def test_every_state_has_a_row_and_terminated_is_terminal() -> None:
    assert set(TRANSITIONS) == set(SessionState)
    assert TRANSITIONS[SessionState.TERMINATED] == {}
    for state in SessionState:
        if state is not SessionState.TERMINATED:
            assert TRANSITIONS[state][SessionEvent.TERMINATE] is SessionState.TERMINATED
            assert TRANSITIONS[state][SessionEvent.EXPIRE] is SessionState.TERMINATED


def test_reattach_returns_to_attached_from_every_live_or_recovering_state() -> None:
    for s in (*LIVE_STATES, SessionState.RECOVERING):
        assert next_state(s, SessionEvent.REATTACH) is SessionState.ATTACHED
    assert not is_allowed(SessionState.BIRTH, SessionEvent.REATTACH)


def test_illegal_transition_names_state_event_and_role() -> None:
    with pytest.raises(IllegalTransition) as e:
        next_state(SessionState.TERMINATED, SessionEvent.REATTACH, "client")
    msg = str(e.value)
    assert "TERMINATED" in msg and "REATTACH" in msg and "client" in msg


@given(st.lists(st.sampled_from(SessionEvent), max_size=30))
def test_machine_versions_increase_by_one_per_applied_event(events: list[SessionEvent]) -> None:
    m = StateMachine()
    for ev in events:
        before = (m.state, m.version)
        if is_allowed(m.state, ev):
            m.apply(ev)
            assert m.version == before[1] + 1
        else:
            with pytest.raises(IllegalTransition):
                m.apply(ev)
            assert (m.state, m.version) == before


def test_lua_table_mentions_every_edge() -> None:
    lua = lua_transition_table()
    for edges in TRANSITIONS.values():
        for ev, to in edges.items():
            assert f"[{int(ev)}] = {int(to)}" in lua
