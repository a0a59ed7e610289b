"""Build and run one gateway process from a GatewayConfig.

Owns everything around the node: the store client (or an embedded
redis-server child when no store URL is configured), the static key and the
key-encryption key, the event bus and its sinks, metrics and the admin HTTP
server. Keys that are not configured are generated for this process only and
said so in the log: fine for a single-node demo, wrong for a cluster (every
node must share the static key and the KEK).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import web

from gateway import status, udp_engine
from gateway.admin_http import bound_port, make_admin_app, start_admin, stop_admin
from gateway.balancer import TrustedBalancers, parse_networks
from gateway.config import (
    GatewayConfig,
    load_kek,
    load_previous_keks,
    load_private_key,
    load_status_token,
)
from gateway.events import EventBus
from gateway.l3 import L3Plane
from gateway.l3_net import L3Config
from gateway.metrics import Metrics
from gateway.node import GatewayNode, NodeSettings
from gateway.quic import QuicListener
from gateway.quic_config import QuicLimits, default_server_id, self_signed, server_configuration
from gateway.sinks import sinks_from_config
from gateway.tcp import TcpLimits
from gateway.tracing import Tracing
from session import dataplane
from session.inner import InnerPool
from session.keys import KekRing, fingerprint, registry_key, relay_key
from session.noise import generate_keypair, public_key
from settings import parse_address
from store.api import SessionStore, StoreConfig
from store.embedded import EmbeddedRedis

log = logging.getLogger("jvpn.gateway")


def tune_gc(cfg: GatewayConfig) -> None:
    """Process-wide garbage-collector thresholds for a gateway process (its entry points
    call this; the library never does it on its own).

    Every reattach allocates a few dozen container objects; with Python's default
    (700, 10, 10) the collector runs hundreds of young passes a second, and the
    older-generation passes traverse every live binding. Measured with
    ``jvpn-lab bench --only reattach --sessions 3000`` (A/B, 2 x 3 runs): 66 and 70 us of
    gateway CPU per reattach at the default, 60 and 63 us at (20000, 50, 100). What the
    gateway allocates is freed by reference counting almost always; the collector is
    only for cycles.
    """
    if cfg.gc_gen0_threshold > 0:
        import gc

        gc.set_threshold(cfg.gc_gen0_threshold, 50, 100)


@dataclass
class Keys:
    private: bytes
    public: bytes
    kek: bytes
    generated: bool
    previous_keks: tuple[bytes, ...] = ()  # KEK rotation: they unwrap and verify, never wrap


def resolve_keys(cfg: GatewayConfig) -> Keys:
    """The configured keys, or fresh ones for this process (logged as such)."""
    priv = load_private_key(cfg)
    kek = load_kek(cfg)
    generated = False
    if priv is None:
        priv, _ = generate_keypair()
        generated = True
    if kek is None:
        kek = os.urandom(32)
        generated = True
    return Keys(priv, public_key(priv), kek, generated, tuple(load_previous_keks(cfg)))


class GatewayApp:
    """One gateway process: start() brings everything up, stop() takes it down."""

    def __init__(self, cfg: GatewayConfig, keys: Keys | None = None,
                 tracing: Tracing | None = None) -> None:
        self.cfg = cfg
        self.tracing = tracing  # None: Tracing.from_env() at start (off unless OTEL_* ask)
        self.keys = keys or resolve_keys(cfg)
        self.embedded: EmbeddedRedis | None = None
        self.store: SessionStore | None = None
        self.node: GatewayNode | None = None
        self.events: EventBus | None = None
        self.metrics = Metrics(cfg.node_id)
        self._admin: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.admin_address = ""  # host:port registered for `jvpn status`

    @property
    def store_url(self) -> str:
        if self.cfg.store_url:
            return self.cfg.store_url
        assert self.embedded is not None
        return self.embedded.url

    def _udp_engine_wanted(self) -> bool:
        """Whether the UDP data path runs in the compiled engine (config ``udp_engine``)."""
        cfg = self.cfg
        why = ""
        if cfg.udp_engine == "off":
            return False
        if dataplane.active() is not dataplane.DataPlane.COMPILED:
            why = "the data plane is not the compiled one"
        elif not udp_engine.available():
            why = "the compiled module has no engine (or is an older build: make dataplane)"
        if why and cfg.udp_engine == "on":
            raise LookupError(f"udp_engine = on, but {why}")
        if why:
            log.info("udp data path: asyncio (%s)", why)
        return not why

    async def start(self) -> GatewayApp:
        cfg = self.cfg
        dataplane.select(cfg.data_plane)  # LookupError when "compiled" is asked for and missing
        log.info("%s", dataplane.describe())
        engine = self._udp_engine_wanted()
        if not cfg.store_url:
            self.embedded = await EmbeddedRedis().astart()
            log.info("no store_url configured: started an embedded redis-server at %s (pid %s)",
                     self.embedded.url, self.embedded.pid)
        store_cfg = StoreConfig(
            socket_timeout_s=cfg.store_timeout_s, connect_timeout_s=cfg.store_timeout_s,
            tombstone_ttl_s=cfg.tombstone_ttl_s,
            timestamp_window_ms=int(cfg.reattach_window_s * 1000),
            dual_active_window_ms=int(cfg.dual_active_window_s * 1000),
            tls_ca_file=cfg.store_tls_ca_file,
        )
        self.store = SessionStore.from_url(self.store_url, store_cfg,
                                           registry_key=registry_key(self.keys.kek))
        ring = KekRing(self.keys.kek, self.keys.previous_keks)
        self.store.previous_registry_keys = ring.registry_keys()[1:]
        if self.keys.generated:
            log.warning("no private_key/kek configured: using keys generated for this process "
                        "only (public key %s)", self.keys.public.hex())
        ev = cfg.events
        self.events = EventBus(cfg.node_id, sinks_from_config(ev, self.store.redis),
                               ev.queue_size, on_drop=self.metrics.event_dropped)
        await self.events.start()
        self.store.on_registry_refused = self._registry_refused
        settings = NodeSettings(
            node_id=cfg.node_id, keepalive_interval=cfg.keepalive_interval_s,
            silence_keepalives=cfg.silence_keepalives,
            reattach_window_ms=int(cfg.reattach_window_s * 1000),
            dual_active_window_ms=int(cfg.dual_active_window_s * 1000),
            sweep_interval=cfg.sweep_interval_s,
            handshake_retry_threshold=float(cfg.handshake_retry_threshold),
            max_sessions=cfg.max_sessions, lease_s=cfg.lease_s,
            source_rate=cfg.source_rate, source_burst=cfg.source_burst,
            registry_staleness_s=cfg.registry_staleness_s,
            keys_reject_after_s=cfg.keys_reject_after_s,
            inner_pool=(InnerPool.parse(cfg.inner_pool_v4, cfg.inner_pool_v6)
                        if cfg.inner_pool_v4 else None),
            relay_not_local=cfg.egress == "routed" and bool(cfg.relay_listen),
        )
        if self.tracing is None:
            self.tracing = Tracing.from_env(cfg.node_id)
        tcp_limits = TcpLimits(
            max_connections=cfg.tcp_max_connections, max_per_source=cfg.tcp_max_per_source,
            first_frame_timeout=cfg.tcp_first_frame_timeout_s, idle_timeout=cfg.tcp_idle_timeout_s,
            write_buffer=cfg.tcp_write_buffer, write_stall=cfg.tcp_write_stall_s,
        )
        self.node = GatewayNode(settings, self.store, self.keys.private, self.keys.kek,
                                self.events, self.metrics, tracing=self.tracing,
                                tcp_limits=tcp_limits,
                                trusted_balancers=TrustedBalancers(
                                    parse_networks(cfg.trusted_balancers)),
                                engine=engine)
        self.node.machine.keks = ring  # the current KEK (as given above) and the previous ones
        udp = parse_address(cfg.listen_udp) if cfg.listen_udp else None
        tcp = parse_address(cfg.listen_tcp) if cfg.listen_tcp else None
        quic = None
        if cfg.listen_quic:
            quic = (parse_address(cfg.listen_quic), self._quic_listener(cfg))
        await self.node.start(udp, tcp, quic)
        if settings.inner_pool is not None and cfg.tun_name:
            l3 = L3Config(
                tun_name=cfg.tun_name, mtu=cfg.tun_mtu, offload=cfg.tun_offload,
                pool=settings.inner_pool,
                egress=cfg.egress, egress_interface=cfg.egress_interface,
                relay_listen=parse_address(cfg.relay_listen) if cfg.relay_listen else None,
                relay_advertise=cfg.relay_advertise, vip=cfg.routed_vip, vip6=cfg.routed_vip6,
                vip_interface=cfg.routed_vip_interface, lease_s=cfg.routed_lease_s)
            self.node.l3 = L3Plane(self.node, l3, relay_key(self.keys.kek))
            try:
                await self.node.l3.start()
            except BaseException:
                await self.node.stop()
                raise
        if cfg.admin:
            host, port = parse_address(cfg.admin)
            serving = asyncio.Event()
            started_ms = int(time.time() * 1000)
            node = self.node
            register = status.registration(
                self.store, cfg.node_id,
                lambda: {"admin": self.admin_address, "instance": node.machine.instance_id,
                         "started_ms": started_ms},
                cfg.node_ttl_s, serving)
            app = make_admin_app(self.metrics, self.node.ready, status.status_routes(),
                                 cleanup_ctx=[register])
            status.configure(app, self.node, load_status_token(cfg))
            self._admin = await start_admin(app, host, port)
            self.admin_port = bound_port(self._admin)
            self.admin_address = status.advertised_admin(cfg.admin, cfg.admin_advertise,
                                                         self.admin_port)
            serving.set()
        log.info("gateway %s up: udp %s tcp %s quic %s admin %s public key %s", cfg.node_id,
                 self.node.udp_address, self.node.tcp_address, self.node.quic_address,
                 self.admin_port, self.keys.public.hex())
        return self

    def _quic_listener(self, cfg: GatewayConfig) -> QuicListener:
        """The QUIC listener: its certificate (configured, else self-signed), ids, limits."""
        assert self.node is not None
        if cfg.quic_cert_file:
            with open(cfg.quic_cert_file, "rb") as f:
                cert = f.read()
            with open(cfg.quic_key_file, "rb") as f:
                key = f.read()
        else:
            cert, key = self_signed(cfg.node_id)
        sid = cfg.quic_server_id if cfg.quic_server_id >= 0 else default_server_id(cfg.node_id)
        limits = QuicLimits(
            max_connections=cfg.quic_max_connections, max_handshaking=cfg.quic_max_handshaking,
            max_per_source=cfg.quic_max_per_source,
            retry_threshold=cfg.quic_retry_threshold,
            handshake_timeout=cfg.quic_handshake_timeout_s, idle_timeout=cfg.quic_idle_timeout_s)
        return QuicListener(self.node, server_configuration(cert, key, cfg.quic_idle_timeout_s),
                            sid, limits)

    def _registry_refused(self, public_key: bytes, why: str) -> None:
        """A client entry failed its MAC check: the client is refused as unknown; say so."""
        if self.events is not None:
            self.events.security_event("registry_entry_refused", "UNKNOWN_CLIENT",
                                       client=fingerprint(public_key), detail=why)
        self.metrics.security("registry_entry_refused")

    async def stop(self) -> None:
        if self._admin is not None:
            await stop_admin(self._admin)
            self._admin = None
        if self.node is not None:
            if self.node.l3 is not None:
                await self.node.l3.stop()
            await self.node.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flush; bounded (5 s), off the loop
        if self.events is not None:
            await _bounded(self.events.stop(), "event bus")
        if self.store is not None:
            await _bounded(self.store.close(), "store client")
        if self.embedded is not None:
            await self.embedded.aclose()
            self.embedded = None


async def _bounded(aw: Awaitable[None], what: str, timeout: float = 5.0) -> None:
    """Shutdown must not hang on one part: give up on it after ``timeout`` and say so."""
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("%s did not close within %.0fs", what, timeout)
