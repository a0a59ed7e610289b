"""The shared test vectors (tests/unit/vectors), on both data planes; the crate's
``cargo test`` reads the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from session import dataplane, framing, replay, wire
from session.errors import RemoteProtocolError

VECTORS = Path(__file__).resolve().parents[1] / "unit" / "vectors"


def implementation(name: str) -> Any:
    if name == "python":
        return framing.DataChannel, replay.ReplayWindow
    module = dataplane.compiled_module()
    if module is None:
        pytest.skip("the compiled data plane (jvpn_dataplane) is not installed")
    return module.DataChannel, module.ReplayWindow


@pytest.fixture(params=["python", "compiled"])
def impl(request: pytest.FixtureRequest) -> Any:
    return implementation(request.param)


def test_framing_vectors(impl: Any) -> None:
    channel_class, _ = impl
    v = json.loads((VECTORS / "dataplane_framing.json").read_text())
    send, recv, sid = bytes.fromhex(v["send_key"]), bytes.fromhex(v["recv_key"]), bytes.fromhex(v["session_id"])
    tx = channel_class(send, recv, sid, v["epoch"])
    for case in v["sealed"]:
        assert tx.seal(bytes.fromhex(case["inner"])).hex() == case["packet"]
    rx = channel_class(recv, send, sid, v["epoch"])
    for step in v["receive"]:
        raw = bytes.fromhex(step["packet"])
        try:
            msg = wire.decode(raw)
            assert isinstance(msg, wire.Data)
            got = {"plain": rx.open(msg, raw).hex()}
        except RemoteProtocolError as exc:
            got = {"error": type(exc).__name__, "reason": exc.reason.name, "code": int(exc.reason)}
        want = {k: step[k] for k in ("plain", "error", "reason", "code") if k in step}
        assert got == want, step["what"]


def test_replay_vectors(impl: Any) -> None:
    _, window_class = impl
    v = json.loads((VECTORS / "replay_window.json").read_text())
    assert v["window"] == replay.REPLAY_WINDOW
    w = window_class()
    for step in v["steps"]:
        c = int(step["counter"])
        assert w.check(c) is step["check"], c
        assert w.update(c) is step["update"], c
        assert w.highest == (None if step["highest"] is None else int(step["highest"]))
