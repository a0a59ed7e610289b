"""UDP-forward mode's flows (FLOW_PAYLOAD) through the engines, against the Python reference.

The far end of each engine is ``session.framing`` / ``session.wire`` (``cryptography``'s
AEAD, no code shared with the module): what the Python side seals as FLOW_PAYLOADs of
random flows the engine delivers to that flow's socket, and what the engine seals for a
flow the Python side opens as that flow's FLOW_PAYLOAD; inner messages that
``wire.decode_inner`` refuses (flow 0 or past MAX_FLOWS, truncated) the engine does not
carry, it hands them up intact and unmarked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session import wire
from session.framing import DataChannel

SID = bytes(range(16))
EPOCH = 5


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    return s


def _until(cond: Callable[[], Any], what: str, timeout: float = 3.0) -> Any:
    """Poll ``cond`` every 5 ms until it returns something true, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _drain(engine: Any, n: int, what: str) -> list[tuple[int, Any, Any]]:
    got: list[tuple[int, Any, Any]] = []
    _until(lambda: got.extend(engine.drain(64)) or len(got) >= n, what)
    return got


def _open_flow(ch: DataChannel, raw: bytes) -> tuple[int, bytes]:
    inner = wire.decode_inner(ch.open(wire.decode(raw), raw))
    assert inner.kind is wire.InnerType.FLOW_PAYLOAD
    return inner.flow, inner.payload


flows = st.integers(min_value=1, max_value=wire.MAX_FLOWS)
bodies = st.binary(min_size=0, max_size=wire.MAX_PAYLOAD_SIZE)


@contextlib.contextmanager
def _gateway(compiled: ModuleType) -> Iterator[tuple[Any, ...]]:
    """A gateway engine with one fast binding; the agent's side is the Python reference."""
    listener, client, upstream = _udp(), _udp(), _udp()
    engine = compiled.GatewayEngine(listener.fileno(), 256)
    k1, k2 = os.urandom(32), os.urandom(32)
    py = DataChannel(k1, k2, SID, EPOCH)  # the agent's side: the Python reference
    rs = compiled.DataChannel(k2, k1, SID, EPOCH)
    client.connect(listener.getsockname())
    now = time.monotonic()
    engine.set_lease(now + 600, now - 1)
    engine.install(SID, rs, client.getsockname(), True, now)
    try:
        yield engine, py, rs, client, upstream
    finally:
        engine.stop()
        for s in (listener, client, upstream):
            s.close()


@settings(max_examples=25, deadline=None)
@given(sent=st.lists(st.tuples(flows, bodies), min_size=1, max_size=8))
def test_gateway_engine_carries_flows_the_reference_sealed(compiled: ModuleType,
                                                           sent: list[tuple[int, bytes]]) -> None:
    with _gateway(compiled) as (engine, py, rs, client, upstream):
        _carry(engine, py, client, upstream, sent)


def _carry(engine: Any, py: DataChannel, client: socket.socket, upstream: socket.socket,
           sent: list[tuple[int, bytes]]) -> None:
    sources: dict[int, tuple[str, int]] = {}
    for flow, body in sent:
        if flow not in sources:  # the machine opens the flow's socket with its first datagram
            engine.to_upstream(SID, upstream.getsockname(), body, flow)
            data, src = upstream.recvfrom(4096)
            assert data == body
            sources[flow] = src
            continue
        client.send(py.seal(wire.inner_flow_payload(flow, body)))
        data, src = upstream.recvfrom(4096)
        assert (data, src) == (body, sources[flow])
    # replies: each flow's, sealed by the engine, opened by the reference as that flow's
    for flow, src in sources.items():
        body = f"reply {flow}".encode()
        upstream.sendto(body, src)
        assert _open_flow(py, client.recv(4096)) == (flow, body)
    engine.close_upstream(SID)


@pytest.mark.parametrize("inner", [
    bytes([wire.InnerType.FLOW_PAYLOAD, 0, 0]) + b"flow zero",
    bytes([wire.InnerType.FLOW_PAYLOAD, 1, 1]) + b"flow 257",
    bytes([wire.InnerType.FLOW_PAYLOAD, 0]),  # truncated
    bytes([wire.InnerType.FLOW_PAYLOAD, 0, 9]) + b"no socket for flow 9",
], ids=["flow-0", "flow-257", "truncated", "unknown-flow"])
def test_gateway_engine_hands_up_what_it_does_not_carry(compiled: ModuleType, inner: bytes) -> None:
    with _gateway(compiled) as (engine, py, rs, client, upstream):
        _hands_up(engine, py, rs, client, upstream, inner)


def _hands_up(engine: Any, py: DataChannel, rs: Any, client: socket.socket,
              upstream: socket.socket, inner: bytes) -> None:
    engine.to_upstream(SID, upstream.getsockname(), b"open", 1)
    upstream.recvfrom(4096)
    raw = py.seal(inner)
    client.send(raw)
    (kind, data, _), = _drain(engine, 1, "the hand-up")
    assert (kind, data) == (0, raw)
    assert rs.highest_received is None  # unmarked: the machine opens it (and counts a refusal)
    with pytest.raises(ValueError):
        engine.to_upstream(SID, upstream.getsockname(), b"x", wire.MAX_FLOWS + 1)


def test_gateway_engine_hands_up_a_flows_reply_with_its_flow(compiled: ModuleType) -> None:
    with _gateway(compiled) as (engine, py, rs, client, upstream):
        _slow_reply(engine, rs, client, upstream)


def _slow_reply(engine: Any, rs: Any, client: socket.socket, upstream: socket.socket) -> None:
    engine.to_upstream(SID, upstream.getsockname(), b"open", 7)
    _, src = upstream.recvfrom(4096)
    now = time.monotonic()
    engine.install(SID, rs, client.getsockname(), False, now)  # not fast: the machine's
    upstream.sendto(b"slow", src)
    (kind, sid, (flow, data)), = _drain(engine, 1, "the reply")
    assert (kind, sid, flow, data) == (3, SID, 7, b"slow")


@settings(max_examples=20, deadline=None)
@given(replies=st.lists(st.tuples(st.integers(0, 2), bodies), min_size=1, max_size=8))
def test_agent_engine_flows_both_ways_with_the_reference(compiled: ModuleType,
                                                         replies: list[tuple[int, bytes]]) -> None:
    local, gw_sock = _udp(), _udp()
    apps = [_udp() for _ in range(3)]
    engine = compiled.AgentEngine(local.fileno(), 256)
    k1, k2 = os.urandom(32), os.urandom(32)
    rs = compiled.DataChannel(k1, k2, SID, EPOCH)  # the agent's, shared with its engine
    py = DataChannel(k2, k1, SID, EPOCH)  # the gateway's side: the Python reference
    path = _udp()
    try:
        path.connect(gw_sock.getsockname())
        engine.add_path(1, path.fileno())
        engine.set_current(1, rs, True)
        # a new source goes up (the agent assigns its flow), then the engine carries it
        apps[0].sendto(b"hello", local.getsockname())
        (kind, data, addr), = _drain(engine, 1, "the new source")
        assert (kind, data, addr) == (0, b"hello", apps[0].getsockname())
        flow_of = {0: 3, 1: 200, 2: wire.MAX_FLOWS}
        for i, app in enumerate(apps):
            engine.set_flow(flow_of[i], app.getsockname())
        for i, app in enumerate(apps):
            app.sendto(f"from {i}".encode(), local.getsockname())
            assert _open_flow(py, gw_sock.recv(4096)) == (flow_of[i], f"from {i}".encode())
        path_addr = path.getsockname()
        for i, body in replies:
            gw_sock.sendto(py.seal(wire.inner_flow_payload(flow_of[i], body)), path_addr)
            data, src = apps[i].recvfrom(4096)
            assert (data, src) == (body, local.getsockname())
        # a flow the engine does not know, and a plain PAYLOAD: up, unmarked
        marked = rs.highest_received
        for inner in (wire.inner_flow_payload(9, b"nobody"), wire.inner_payload(b"plain")):
            raw = py.seal(inner)
            gw_sock.sendto(raw, path_addr)
            (kind, pid, data), = _drain(engine, 1, "the hand-up")
            assert (kind, pid, data) == (1, 1, raw)
        assert rs.highest_received == marked
        # a flow given to another source: the old source's datagrams go up again
        engine.set_flow(3, apps[1].getsockname())
        assert sorted(f for f, _ in engine.flow_times()) == [3, wire.MAX_FLOWS]
        apps[0].sendto(b"orphan", local.getsockname())
        (kind, data, addr), = _drain(engine, 1, "the orphaned source")
        assert (kind, data) == (0, b"orphan")
        with pytest.raises(ValueError):
            engine.set_flow(0, apps[0].getsockname())
    finally:
        engine.stop()
        for s in (local, gw_sock, path, *apps):
            s.close()
