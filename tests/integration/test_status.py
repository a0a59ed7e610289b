"""The operators' view against real gateways and a real redis-server: /status on each
node's admin port, node registration, ``jvpn status`` joining both, filters and id
prefixes, ``jvpn sessions terminate --client``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from jvpn.cli import main as jvpn_main
from session.states import SessionState
from tests.support.harness import echo_upstream, shared_keys, start_gateway, wait_for


async def jvpn(*argv: str) -> int:
    """Run the jvpn command as an operator would (its own event loop, in a thread)."""
    return await asyncio.to_thread(jvpn_main, list(argv))


async def get_json(url: str, token: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return r.status, await r.json()


async def test_status_joins_the_store_and_every_node(
        redis_url: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(shared_keys().kek.hex())
    kek_file.chmod(0o600)
    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    alice, _ = await a.add_client(upstream, name="alice")
    bob, _ = await a.add_client(upstream, name="bob")
    got: list[bytes] = []
    agents = [a.agent(alice, upstream, name="alice-1", on_payload=got.append),
              b.agent(alice, upstream, name="alice-2"),
              a.agent(bob, upstream, name="bob")]
    store = ["--store-url", redis_url]
    try:
        for ag in agents:
            await ag.start()
            await ag.wait_connected(5)
        for i in range(10):
            agents[0].send(b"x" * 100 + bytes([i]))
        await wait_for(lambda: len(got) >= 10, 5, "echoes")
        sid = agents[0].machine.session_id

        # The node's own view: loopback, every binding it holds, counted both ways.
        status, doc = await get_json(f"http://127.0.0.1:{a.app.admin_port}/status")
        assert status == 200 and doc["node"] == "gw-a"
        mine = {s["session_id"]: s for s in doc["sessions"]}
        assert set(mine) == {agents[0].machine.session_id.hex(), agents[2].machine.session_id.hex()}
        row = mine[sid.hex()]
        assert row["rx_packets"] >= 10 and row["tx_packets"] >= 10
        assert row["rx_bytes"] >= 10 * 101 and row["tx_bytes"] >= 10 * 101
        assert row["transport"] == "udp" and row["endpoint"].startswith("127.0.0.1:")
        assert doc["store"]["up"] and doc["store"]["latency_ms"] is not None

        # Registered nodes, plus one that is registered but does not answer.
        await a.store.register_node("gw-ghost", {"admin": "127.0.0.1:9"}, 30)
        capsys.readouterr()
        assert await jvpn("status", *store, "--json", "--kek-file", str(kek_file)) == 0
        view = json.loads(capsys.readouterr().out)
        nodes = {n["node"]: n for n in view["nodes"]}
        assert set(nodes) == {"gw-a", "gw-b", "gw-ghost"}
        assert nodes["gw-a"]["answering"] and nodes["gw-a"]["ready"]
        assert nodes["gw-a"]["sessions_by_state"] == {"ATTACHED": 2}
        assert not nodes["gw-ghost"]["answering"] and nodes["gw-ghost"]["error"]
        rows = {r["session_id"]: r for r in view["sessions"]}
        assert len(rows) == 3
        r = rows[sid.hex()]
        assert r["client"] == "alice" and r["node"] == "gw-a" and r["state"] == "ATTACHED"
        assert r["version"] == agents[0].machine.version and r["epoch"] == 1
        assert r["rx_packets"] >= 10 and r["tx_bytes"] >= 10 * 101
        assert r["idle_s"] is not None and r["idle_s"] < 2.0  # keepalives every 0.1 s
        assert r["uptime_s"] >= 0 and 0 < r["ttl_left_s"] <= 300
        assert r["last_handshake_age_s"] is not None and r["inner_addresses"] == []

        # Filters.
        assert await jvpn("status", *store, "--json", "--kek-file", str(kek_file),
                          "--client", "alice", "--node", "gw-b") == 0
        view = json.loads(capsys.readouterr().out)
        assert [r["session_id"] for r in view["sessions"]] == [agents[1].machine.session_id.hex()]
        assert [n["node"] for n in view["nodes"]] == ["gw-b"]
        assert await jvpn("status", *store, "--json", "--state", "recovering") == 0
        assert json.loads(capsys.readouterr().out)["sessions"] == []
        assert await jvpn("status", *store, "--json", "--watch", "0.05", "--count", "2") == 0
        rounds = capsys.readouterr().out.strip().splitlines()
        assert len(rounds) == 2 and all(len(json.loads(x)["sessions"]) == 3 for x in rounds)

        # The short id the text view shows selects the session; bad prefixes are clear errors.
        assert await jvpn("status", *store, "--kek-file", str(kek_file), sid.hex()[:12]) == 0
        text = capsys.readouterr().out
        assert f"session: {sid.hex()[:12]}  client alice" in text
        assert "NOT ANSWERING" in text and "transfer:" in text
        assert await jvpn("sessions", "show", *store, sid.hex()[:8]) == 0
        assert json.loads(capsys.readouterr().out)["session_id"] == sid.hex()
        assert await jvpn("sessions", "show", *store, "") == 1  # (ambiguity: tests/unit)
        err = capsys.readouterr().err
        assert "not a hex session id" in err and "Traceback" not in err
        unknown = "0" * 20 if not any(ag.machine.session_id.hex().startswith("0" * 20)
                                      for ag in agents) else "f" * 20
        assert await jvpn("sessions", "show", *store, unknown) == 1
        assert "no session id starts with" in capsys.readouterr().err
        assert await jvpn("status", *store, "zz") == 1
        assert "not a hex session id" in capsys.readouterr().err

        # Every session of one client ends; the others stay.
        assert await jvpn("sessions", "terminate", *store, "--kek-file", str(kek_file),
                          "--client", "alice") == 0
        assert "2 sessions of alice ended" in capsys.readouterr().err
        await wait_for(lambda: agents[0].terminated_sessions == 1
                       and agents[1].terminated_sessions == 1, 5, "alice's agents closed")
        assert agents[2].terminated_sessions == 0
        assert agents[2].machine.state is SessionState.ATTACHED
    finally:
        for ag in agents:
            await ag.stop()
        echo.close()
        await a.app.stop()
        await b.app.stop()


async def test_status_needs_the_token_when_one_is_set_and_a_stopped_node_leaves(
        redis_url: str) -> None:
    gw = await start_gateway(redis_url, node_id="gw-t", status_token="s3cret")
    url = f"http://127.0.0.1:{gw.app.admin_port}/status"
    try:
        status, doc = await get_json(url)
        assert status == 401 and "token" in doc["error"]
        status, _ = await get_json(url, token="wrong")
        assert status == 401
        status, doc = await get_json(url, token="s3cret")
        assert status == 200 and doc["node"] == "gw-t"
        nodes = await gw.store.list_nodes()
        assert [n["node"] for n in nodes] == ["gw-t"]
        assert nodes[0]["admin"] == f"127.0.0.1:{gw.app.admin_port}"
    finally:
        await gw.app.stop()
    from store.api import SessionStore

    async with SessionStore(redis_url) as store:
        assert await store.list_nodes() == []
