"""Test harness: a real gateway on loopback, registered clients, agents, an echo upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.agent import Agent, AgentSettings
from gateway.app import GatewayApp, Keys
from gateway.config import load_gateway_config
from gateway.ecs import Event
from instruments.netsim import UdpEcho
from session.client import ClientParams
from session.noise import generate_keypair, public_key
from session.states import SessionState
from store.policy import ClientPolicy

# The live states: the session is bound and carries data. VOLATILE and DEGRADED only
# grade the path's figures (jitter, RTT, loss), which a loaded CI box moves at will;
# a test about keeping the session checks for these, not for ATTACHED alone.
LIVE_STATES = frozenset(s.name for s in (SessionState.ATTACHED, SessionState.VOLATILE,
                                         SessionState.DEGRADED))

FAST = ClientParams(keepalive_interval=0.1, dead_after=3, handshake_timeout=0.5,
                    reattach_timeout=0.25, backoff_initial=0.05, backoff_max=0.5)


@dataclass
class Gateway:
    app: GatewayApp
    events: list[Event] = field(default_factory=list)

    @property
    def node(self):  # type: ignore[no-untyped-def]
        assert self.app.node is not None
        return self.app.node

    @property
    def store(self):  # type: ignore[no-untyped-def]
        assert self.app.store is not None
        return self.app.store

    @property
    def udp(self) -> tuple[str, int]:
        assert self.node.udp_address is not None
        return self.node.udp_address

    @property
    def tcp(self) -> tuple[str, int]:
        assert self.node.tcp_address is not None
        return self.node.tcp_address

    @property
    def quic(self) -> tuple[str, int]:
        assert self.node.quic_address is not None
        return self.node.quic_address

    def actions(self, action: str) -> list[dict]:  # type: ignore[type-arg]
        return [e.fields for e in self.events if e.action == action]

    async def add_client(self, upstream: str, **policy: object) -> tuple[bytes, bytes]:
        priv, pub = generate_keypair()
        await self.store.add_client(ClientPolicy(pub, upstreams=(upstream,), **policy))  # type: ignore[arg-type]
        return priv, pub

    def agent(self, priv: bytes, upstream: str, params: ClientParams = FAST,
              transports: list[str] | None = None, name: str = "agent",
              gateways: list[tuple[str, int]] | None = None,
              quic_gateways: list[tuple[str, int]] | None = None,
              on_payload: Callable[[bytes], None] | None = None) -> Agent:
        from dataclasses import replace

        s = AgentSettings(
            private_key=priv, gateway_public_key=self.app.keys.public,
            gateways=gateways or [self.udp], tcp_gateways=[self.tcp], upstream=upstream,
            quic_gateways=quic_gateways if quic_gateways is not None
            else [self.quic] if self.node.quic_address else [],
            local_udp=None, transports=transports or ["udp", "tcp"],
            params=replace(params, upstream=upstream), name=name)
        return Agent(s, on_payload=on_payload)


_KEYS: Keys | None = None


def test_data_plane() -> str:
    """The data plane this test run uses: ``JVPN_DATA_PLANE`` (auto, compiled, python),
    else auto; ``make test`` runs the suite on both (tests/conftest.py)."""
    import os

    return os.environ.get("JVPN_DATA_PLANE", "auto")


def shared_keys() -> Keys:
    """One static key and KEK for every gateway of a test run (a cluster shares them)."""
    global _KEYS
    if _KEYS is None:
        import os

        priv, _ = generate_keypair()
        _KEYS = Keys(priv, public_key(priv), os.urandom(32), generated=False)
    return _KEYS


async def start_gateway(redis_url: str, node_id: str = "gw-test", **overrides: object) -> Gateway:
    opts: dict[str, object] = {
        "node_id": node_id, "listen_udp": "127.0.0.1:0", "listen_tcp": "127.0.0.1:0",
        "listen_quic": "127.0.0.1:0",
        "admin": "127.0.0.1:0", "store_url": redis_url, "keepalive_interval_s": 0.1,
        "sweep_interval_s": 0.1, "handshake_retry_threshold": -1,
        "events.redis_stream": False,
        "data_plane": test_data_plane(),
    }
    opts.update(overrides)
    cfg = load_gateway_config(None, env={}, overrides=opts)
    app = GatewayApp(cfg, shared_keys())
    gw = Gateway(app)
    await app.start()
    assert app.events is not None
    app.events.subscribe(gw.events.append)
    return gw


async def echo_upstream() -> tuple[UdpEcho, str]:
    echo, addr = await UdpEcho.start()
    return echo, f"{addr[0]}:{addr[1]}"


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
