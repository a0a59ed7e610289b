"""KEK rotation without downtime: sessions and registry entries of the old KEK stay valid.

A node configured ``kek = B, kek_previous = [A]`` (the second step of a rotation, README:
Configuration) takes over a session born under A (its wrapped secret unwraps with the
ring), accepts a registry entry MAC'd under A, and wraps what it births under B;
``jvpn clients remac`` then rewrites every entry under B, after which A can be dropped.
A node holding only B refuses the old session (the first step of the procedure is there
so that no node is ever in that position while a session born under the other KEK lives).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.app import GatewayApp
from gateway.config import load_gateway_config
from jvpn import cli
from session import wire
from session.keys import kek_id, registry_key
from store.api import SessionStore
from store.policy import ClientPolicy
from tests.support.harness import Gateway, echo_upstream, shared_keys
from tests.support.rawclient import Endpoint, RawSession

A, B = os.urandom(32), os.urandom(32)


async def _gateway(redis_url: str, node_id: str, **overrides: object) -> Gateway:
    """A gateway whose KEKs come from its config (as in production); the shared static key."""
    opts: dict[str, object] = {
        "node_id": node_id, "listen_udp": "127.0.0.1:0", "listen_tcp": "127.0.0.1:0",
        "admin": "", "store_url": redis_url, "keepalive_interval_s": 0.1,
        "sweep_interval_s": 0.1, "handshake_retry_threshold": -1, "events.redis_stream": False,
        "private_key": shared_keys().private.hex(),
    }
    app = GatewayApp(load_gateway_config(None, env={}, overrides={**opts, **overrides}))
    gw = Gateway(app)
    await app.start()
    assert app.events is not None
    app.events.subscribe(gw.events.append)
    return gw


def _key_file(path: Path, key: bytes) -> str:
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return str(path)


async def test_a_session_and_an_entry_of_the_old_kek_survive_the_rotation(
        redis_url: str, tmp_path: Path) -> None:
    old = await _gateway(redis_url, "gw-old", kek=A.hex())
    new = await _gateway(redis_url, "gw-new", kek_file=_key_file(tmp_path / "b", B),
                         kek_previous_files=[_key_file(tmp_path / "a", A)])
    only_b = await _gateway(redis_url, "gw-only-b", kek=B.hex())
    echo, upstream = await echo_upstream()
    eps: list[Endpoint] = []

    async def ep_of(gw: Gateway) -> Endpoint:
        ep = await Endpoint.udp(gw.udp)
        eps.append(ep)
        return ep

    try:
        assert old.store.registry_key == registry_key(A)
        priv, pub = await old.add_client(upstream)  # MAC'd under A
        s = RawSession(priv, old.app.keys.public, upstream)
        await s.connect(await ep_of(old))  # born under A
        rec = await old.store.get(s.session_id)
        assert rec is not None and rec.wrapped_secret[:4] == bytes([3]) + kek_id(A)

        # A node holding only B cannot take the session over (what the ring is for).
        refused = await s.reattach(await ep_of(only_b), validate=False)
        assert not isinstance(refused.msg, wire.ReattachAck)

        # kek = B, kek_previous = [A]: the session moves there and carries data.
        ep = await ep_of(new)
        got = await s.reattach(ep)
        assert isinstance(got.msg, wire.ReattachAck), got.msg
        assert got.msg.node_id.startswith(b"gw-new")
        await s.keepalive(ep)
        ep.send(s.payload_packet(b"after the rotation"))
        inner = await s.next_inner(ep, lambda i: i.kind is wire.InnerType.PAYLOAD)
        assert inner.payload == b"after the rotation"

        # The entry MAC'd under A is accepted there: a new session is born, under B.
        s2 = RawSession(priv, new.app.keys.public, upstream)
        await s2.connect(await ep_of(new))
        rec2 = await new.store.get(s2.session_id)
        assert rec2 is not None and rec2.wrapped_secret[:4] == bytes([3]) + kek_id(B)

        # remac: read with the ring, written under B; then B alone reads it, A alone not.
        argv = ["clients", "remac", "--store-url", redis_url,
                "--kek-file", _key_file(tmp_path / "b2", B),
                "--kek-previous-file", _key_file(tmp_path / "a2", A)]
        assert await asyncio.to_thread(cli.main, argv) == 0
        only_new = SessionStore(redis_url, registry_key=registry_key(B))
        only_old = SessionStore(redis_url, registry_key=registry_key(A))
        try:
            got_policy = await only_new.get_client(pub)
            assert isinstance(got_policy, ClientPolicy) and got_policy.upstreams == (upstream,)
            assert await only_old.get_client(pub) is None
        finally:
            await only_new.close()
            await only_old.close()
    finally:
        for e in eps:
            e.close()
        echo.close()
        for gw in (old, new, only_b):
            await gw.app.stop()
