"""The transition table: legal edges, illegal ones raise naming state and event; adoption."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from session.errors import IllegalAdoption, IllegalTransition
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


def test_a_client_copy_changes_state_but_never_counts_versions() -> None:
    m = StateMachine(role="client", authoritative=False)
    m.adopt(2, SessionEvent.HANDSHAKE_COMPLETE)
    assert (m.state, m.version) == (SessionState.ATTACHED, 2)
    m.apply(SessionEvent.QUALITY_VOLATILE)
    m.apply(SessionEvent.TRANSPORT_LOST)
    assert (m.state, m.version) == (SessionState.RECOVERING, 2)
    m.adopt(3)  # learnt a newer version (a STALE_VERSION answer): the state stays
    assert (m.state, m.version) == (SessionState.RECOVERING, 3)
    m.adopt(4, SessionEvent.REATTACH)
    assert (m.state, m.version) == (SessionState.ATTACHED, 4)
    m.apply(SessionEvent.TERMINATE, reason=1)
    assert (m.state, m.version, m.terminate_reason) == (SessionState.TERMINATED, 4, 1)


@pytest.mark.parametrize(("state", "version", "event", "offered"), [
    (SessionState.ATTACHED, 3, SessionEvent.REATTACH, 3),  # an event must advance the version
    (SessionState.RECOVERING, 3, SessionEvent.REATTACH, 2),  # never backwards
    (SessionState.RECOVERING, 3, None, 2),
    (SessionState.ATTACHED, 3, SessionEvent.HANDSHAKE_COMPLETE, 9),  # no such edge
    (SessionState.TERMINATED, 3, SessionEvent.REATTACH, 9),
])
def test_illegal_adoption_raises_naming_event_role_and_state_and_changes_nothing(
        state: SessionState, version: int, event: SessionEvent | None, offered: int) -> None:
    m = StateMachine(state, version, role="client", authoritative=False)
    with pytest.raises(IllegalAdoption) as e:
        m.adopt(offered, event)
    assert isinstance(e.value, IllegalTransition)
    msg = str(e.value)
    assert "client" in msg and state.name in msg and str(offered) in msg
    assert (event.name if event else "without an event") in msg
    assert (m.state, m.version) == (state, version)


@given(st.lists(st.tuples(st.sampled_from([None, *SessionEvent]), st.integers(0, 20)), max_size=30))
def test_adoption_follows_the_table_and_never_moves_the_version_back(
        steps: list[tuple[SessionEvent | None, int]]) -> None:
    m = StateMachine(role="client", authoritative=False)
    for event, version in steps:
        before = (m.state, m.version)
        try:
            m.adopt(version, event)
        except IllegalAdoption:
            assert (m.state, m.version) == before
            continue
        assert m.version >= before[1]
        if event is not None:
            assert m.state is TRANSITIONS[before[0]][event] and m.version > before[1]
