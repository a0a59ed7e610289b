"""The client machine's inputs from a compiled engine that seals and opens DATA by itself:
what it sent and heard arms and clears the silence probe as the machine's own DATA does,
and a NOT_BOUND_HERE hint about a packet the engine sealed is believed."""

from __future__ import annotations

import os

from session import control, wire
from session.client import TransportLost
from session.reasons import NoticeKind
from session.states import SessionState
from tests.unit.test_client import connected, events


def test_what_the_engine_sent_arms_the_probe_and_what_it_heard_clears_it() -> None:
    c, gw = connected(probe_silence=0.1)
    assert c.get_timer() is not None and c.get_timer() > 0.2  # no data: no probe due
    c.engine_activity(sent=0.02, heard=None)  # the engine sealed DATA at 0.02
    probe_at = c.get_timer()
    assert probe_at is not None and 0.119 <= probe_at <= 0.121  # as for the machine's own
    c.engine_activity(sent=None, heard=0.05)  # it heard the gateway: nothing unanswered
    assert c.get_timer() is None or c.get_timer() > 0.2
    c.engine_activity(sent=0.04, heard=None)  # sent before what was heard: answered
    assert c.get_timer() is None or c.get_timer() > 0.2
    # sent and never answered: probe, then lost after one more period
    c.engine_activity(sent=0.6, heard=None)
    t = 0.6
    while c.state is not SessionState.RECOVERING and t < 2:
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
        c.datagrams_to_send()
    assert c.state is SessionState.RECOVERING and t <= 0.85
    assert any(isinstance(e, TransportLost) and "probe" in e.reason for e in events(c))


def test_a_hint_about_a_packet_the_engine_sealed_is_believed() -> None:
    c, gw = connected()
    tag = os.urandom(16)  # the AEAD tag of a packet the engine sealed
    hint = wire.Notice(gw.sid, NoticeKind.NOT_BOUND_HERE, 0, c.version, tag, 1)
    c.receive(control.seal(hint, gw.keys.control_key), 1, 0.06)
    assert c.state is SessionState.ATTACHED  # not ours as far as the machine knows
    c.sealed_elsewhere([tag])
    hint = wire.Notice(gw.sid, NoticeKind.NOT_BOUND_HERE, 0, c.version, tag, 2)
    c.receive(control.seal(hint, gw.keys.control_key), 1, 0.07)
    assert c.state is SessionState.RECOVERING
