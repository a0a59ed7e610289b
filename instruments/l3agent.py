"""An L3 agent driven over stdin, for tests in network namespaces (run under ``ip netns exec``).

Arguments: one JSON object (AgentSettings fields; keys hex). The data plane is
``data_plane`` in it, else ``JVPN_AGENT_DATA_PLANE`` / ``JVPN_DATA_PLANE``, else auto; on the
compiled one the compiled engine carries the TUN (``engine``: false turns it off), with TUN
offloads unless ``tun_offload`` (or ``JVPN_AGENT_TUN_OFFLOAD``) is false. Commands on stdin, one per
line, each answered by one JSON line: ``status``, ``jump udp|tcp [host:port]``, ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from agent import udp_engine
from agent.agent import Agent, AgentSettings
from agent.l3 import L3Settings
from session import dataplane
from session.client import ClientParams


def _settings(raw: dict) -> AgentSettings:  # type: ignore[type-arg]
    def addr(s: str) -> tuple[str, int]:
        host, _, port = s.rpartition(":")
        return host, int(port)

    params = ClientParams(keepalive_interval=raw.get("keepalive", 0.2), dead_after=3,
                          probe_silence=raw.get("probe_silence", 0.08),
                          handshake_timeout=0.5, reattach_timeout=0.2, backoff_initial=0.05,
                          backoff_max=0.5, l3=True,
                          rekey_after=raw.get("rekey_after", 120.0))
    return AgentSettings(
        private_key=bytes.fromhex(raw["private_key"]),
        gateway_public_key=bytes.fromhex(raw["gateway_public_key"]),
        gateways=[addr(a) for a in raw["gateways"]],
        tcp_gateways=[addr(a) for a in raw["gateways"]], upstream="", local_udp=None,
        quic_gateways=[addr(a) for a in raw.get("quic_gateways", [])],
        transports=raw.get("transports", ["udp", "tcp"]), params=params, name="l3agent",
        l3=L3Settings(tun_name=raw.get("tun", "jvpn0"), offload=raw.get(
            "tun_offload", os.environ.get("JVPN_AGENT_TUN_OFFLOAD", "true").lower()
            not in ("0", "false", "no", "off"))),
        engine=raw.get("engine", True) and dataplane.active() is dataplane.DataPlane.COMPILED
        and udp_engine.available())


async def main() -> None:
    raw = json.loads(sys.argv[1])
    dataplane.select(raw.get("data_plane") or os.environ.get("JVPN_AGENT_DATA_PLANE")
                     or os.environ.get("JVPN_DATA_PLANE", "auto"))
    logging.getLogger("jvpn.agent").info("%s", dataplane.describe())
    agent = Agent(_settings(raw))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await agent.start()
    term = asyncio.Event()  # SIGTERM: stop as the CLI does (everything installed goes)
    loop.add_signal_handler(signal.SIGTERM, term.set)
    commands = asyncio.ensure_future(_commands(agent, reader))
    try:
        await asyncio.wait([commands, asyncio.ensure_future(term.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        commands.cancel()
        await agent.stop()
        print(json.dumps({"stopped": True}), flush=True)


async def _commands(agent: Agent, reader: asyncio.StreamReader) -> None:
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            break
        cmd = line.split()
        out: dict[str, object] = {}
        if cmd[0] == "status":
            st = agent.status()
            l3 = agent.l3
            out = {"state": str(st["state"]), "transport": st["transport"],
                   "node": st["node"], "connected": agent.connected.is_set(),
                   "session": agent.machine.session_id.hex(),
                   "inner": l3.inner.text() if l3 and l3.inner else "",
                   "mtu": l3.mtu if l3 else 0, "jumps": [j.__dict__ for j in agent.jumps],
                   "handshakes": agent.handshakes,
                   "engine": agent.engine.counters() if agent.engine is not None else {}}
        elif cmd[0] == "jump":
            remote = None
            if len(cmd) > 2:
                host, _, port = cmd[2].rpartition(":")
                remote = (host, int(port))
            await agent.jump(cmd[1], reason="test", remote=remote)
            out = {"ok": True}
        print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main())
