"""A gateway and an agent through real sockets on each data plane: the configured data
plane is the one whose channels the machines use. (Across planes the wire is the same
bytes: test_dataplane_differential.py.)"""

from __future__ import annotations

from types import ModuleType

import pytest

from session import dataplane, framing
from tests.support.harness import echo_upstream, start_gateway, wait_for


@pytest.mark.parametrize("plane", ["python", "compiled"])
async def test_datagrams_flow_on_each_data_plane(redis_url: str, compiled: ModuleType,
                                                 plane: str) -> None:
    classes = {"python": framing.DataChannel, "compiled": compiled.DataChannel}
    before = dataplane.active()
    gw = await start_gateway(redis_url, data_plane=plane)  # the choice is process-wide
    assert dataplane.active().value == plane
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        for i in range(30):
            agent.send(f"d-{i}".encode())
        await wait_for(lambda: len(got) >= 30, 5, "echoes")
        assert type(agent.machine._channel) is classes[plane]
        bindings = list(gw.node.machine.bindings.values())
        assert bindings and all(type(b.channel) is classes[plane] for b in bindings)
        assert sorted(got) == sorted(f"d-{i}".encode() for i in range(30))
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()
        dataplane.select(before)


def test_compiled_on_request_fails_loudly_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    before = dataplane.active()
    monkeypatch.setattr(dataplane, "compiled_module", lambda: None)
    try:
        with pytest.raises(LookupError):
            dataplane.select("compiled")
        assert dataplane.select("auto") is dataplane.DataPlane.PYTHON
        assert "not installed" in dataplane.describe()
    finally:
        monkeypatch.undo()
        dataplane.select(before)
