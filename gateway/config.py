"""Gateway configuration: ``[gateway]`` in a TOML file, ``JVPN_GATEWAY_*`` env, flags.

Precedence is defaults < TOML < env < flags (see ``settings``). The
file is ``path``, else ``$JVPN_GATEWAY_CONFIG``, else none.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from session.inner import InnerPool
from settings import (
    ADDRESS,
    IDENT,
    KEY32,
    PEER,
    REDIS_URL,
    URL,
    load_component,
    parse_address,
    read_key_setting,
    setting,
)

ENV_PREFIX = "JVPN_GATEWAY_"
CONFIG_ENV = "JVPN_GATEWAY_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """Where structured (ECS) events go; all sinks are fed from one bounded queue."""

    stdout: bool = setting(False, help="JSON lines to stdout")
    file: str = setting("", help="append JSON lines to this file ('' = off)")
    redis_stream: bool = setting(True, help="XADD to the cluster audit stream")
    redis_stream_name: str = setting("jvpn:audit", help="audit stream key")
    redis_stream_maxlen: int = setting(100_000, min=1, max=100_000_000)
    siem_syslog: str = setting("", kind=PEER, allow_empty=True, help="RFC 5424 over UDP, host:port")
    siem_http: str = setting("", kind=URL, allow_empty=True, help="POST NDJSON batches here")
    http_timeout_s: float = setting(2.0, min=0.05, max=60.0)
    queue_size: int = setting(10_000, min=1, max=10_000_000, help="events beyond it are dropped")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Settings of one gateway node."""

    node_id: str = setting("", kind=IDENT, allow_empty=True, help="'' = <hostname>-<udp port>")
    listen_udp: str = setting("127.0.0.1:51820", kind=ADDRESS)
    listen_tcp: str = setting("127.0.0.1:51820", kind=ADDRESS, allow_empty=True, help="'' = off")
    listen_quic: str = setting(
        "", kind=ADDRESS, allow_empty=True,
        help="QUIC listener (session messages in DATAGRAM frames, ALPN jvpn/1); '' = off",
    )
    admin: str = setting("127.0.0.1:9100", kind=ADDRESS, allow_empty=True, help="'' = off")
    store_url: str = setting(
        "", kind=REDIS_URL, allow_empty=True, help="'' = start an embedded redis-server"
    )
    private_key: str = setting("", kind=KEY32, allow_empty=True, secret=True)
    private_key_file: str = setting("")
    kek: str = setting("", kind=KEY32, allow_empty=True, secret=True, help="cluster KEK")
    kek_file: str = setting("")
    kek_previous: list[str] = setting(
        [], kind=KEY32, unique=True, secret=True,
        help="previous cluster KEKs, during a KEK rotation: they unwrap sessions and verify "
        "registry entries, never wrap or MAC (README: Configuration, KEK rotation)",
    )
    kek_previous_files: list[str] = setting([], help="files of previous KEKs (as kek_file)")
    keepalive_interval_s: float = setting(1.0, min=0.01, max=3600.0)
    silence_keepalives: int = setting(
        3, min=1, max=1000, help="binding lost after N silent intervals"
    )
    reattach_window_s: float = setting(30.0, min=1.0, max=3600.0, help="proof timestamp window")
    dual_active_window_s: float = setting(2.0, min=0.0, max=600.0)
    store_timeout_s: float = setting(1.0, min=0.01, max=60.0)
    tombstone_ttl_s: float = setting(3600.0, min=1.0, max=30 * 86400.0)
    sweep_interval_s: float = setting(1.0, min=0.01, max=3600.0)
    handshake_retry_threshold: int = setting(
        1000, min=-1, max=10_000_000, help="handshakes/s needing a RETRY cookie; 0 always, -1 never"
    )
    max_sessions: int = setting(100_000, min=1, max=100_000_000)
    source_rate: float = setting(
        200.0, min=-1.0, max=10_000_000.0,
        help="store-costing requests/s one source address may cause before it is "
             "authenticated (handshakes, unknown sessions); -1 unlimited",
    )
    source_burst: float = setting(400.0, min=1.0, max=10_000_000.0)
    registry_staleness_s: float = setting(
        10.0, min=0.1, max=86400.0,
        help="how old a node's view of a client's registry entry may be at a reattach or "
             "refresh (a removed client is refused within this)",
    )
    lease_s: float = setting(
        3.0, min=0.1, max=3600.0,
        help="stop forwarding when the store has not answered for this long (fail closed)",
    )
    keys_reject_after_s: float = setting(
        180.0, min=1.0, max=86400.0,
        help="drop data under a session secret older than this: agents REKEY (a fresh "
             "Diffie-Hellman) before it, by default every 120 s",
    )
    tcp_max_connections: int = setting(
        1024, min=1, max=1_000_000,
        help="open TCP connections at most; lowered at start to what RLIMIT_NOFILE leaves "
        "(2 descriptors per connection: it and its session's upstream socket; 64 kept back)",
    )
    tcp_max_per_source: int = setting(
        16, min=0, max=1_000_000,
        help="open TCP connections per source address; 0 = no limit (behind a balancer "
        "without PROXY protocol every connection has the balancer's address)",
    )
    tcp_first_frame_timeout_s: float = setting(
        5.0, min=0.01, max=3600.0, help="close a connection without one whole frame by then"
    )
    tcp_idle_timeout_s: float = setting(
        60.0, min=0.01, max=86400.0,
        help="close a connection that sent no frame for this long (a live client sends a "
        "keepalive every keepalive_interval_s; must exceed 3 of them)",
    )
    tcp_write_buffer: int = setting(
        256 * 1024, min=4096, max=1 << 30,
        help="bytes queued to one connection before its frames are dropped (high-water mark)",
    )
    tcp_write_stall_s: float = setting(
        10.0, min=0.01, max=3600.0, help="abort a connection kept above tcp_write_buffer this long"
    )
    quic_cert_file: str = setting(
        "", help="PEM certificate (chain) of the QUIC listener; '' = a self-signed one made at "
        "start. It authenticates nothing: clients pin the Noise key, not this certificate",
    )
    quic_key_file: str = setting("", help="PEM private key of quic_cert_file")
    quic_server_id: int = setting(
        -1, min=-1, max=65535,
        help="the node's id in its QUIC connection IDs, which the balancer routes by; "
        "-1 = 16 bits of a hash of node_id (must differ between the nodes behind one balancer)",
    )
    quic_max_connections: int = setting(1024, min=1, max=1_000_000)
    quic_max_handshaking: int = setting(
        256, min=1, max=1_000_000, help="QUIC connections still in their handshake, at most"
    )
    quic_max_per_source: int = setting(
        16, min=0, max=1_000_000,
        help="open QUIC connections per client address (the balancer's carried one); 0 = no limit",
    )
    quic_retry_threshold: int = setting(
        64, min=0, max=1_000_000,
        help="handshaking QUIC connections above which new clients must echo a Retry token",
    )
    quic_handshake_timeout_s: float = setting(5.0, min=0.01, max=3600.0)
    quic_idle_timeout_s: float = setting(
        60.0, min=0.01, max=86400.0, help="QUIC's idle timeout (must exceed 3 keepalives)"
    )
    inner_pool_v4: str = setting(
        "", help="L3 sessions: the cluster's inner IPv4 pool (a prefix, the same on every node; "
        "'' = no L3 sessions); its first address is the gateways' own inner address",
    )
    inner_pool_v6: str = setting(
        "", help="L3 sessions: the cluster's inner IPv6 pool (set with inner_pool_v4)",
    )
    tun_name: str = setting(
        "jvpn0", kind=IDENT, allow_empty=True,
        help="L3: the node's TUN interface (created at start, removed at stop); '' = none "
        "(sessions get their addresses, their packets are dropped and counted)",
    )
    tun_mtu: int = setting(1420, min=1280, max=9000, help="L3: the node TUN's MTU")
    tun_offload: bool = setting(
        True, help="L3 with the compiled engine: the TUN hands over and takes TCP "
        "super-packets (IFF_VNET_HDR, TSO/GRO; the engine cuts and merges them); said at start",
    )
    egress: str = setting(
        "nat", choices=("nat", "routed"),
        help="L3 egress: nat (nftables masquerade out of this node) or routed (the pools are "
        "routed to the cluster; a node relays return traffic to the node holding the binding)",
    )
    egress_interface: str = setting(
        "", help="L3 nat: masquerade only out of this interface ('' = any but the TUN)",
    )
    relay_listen: str = setting(
        "", kind=ADDRESS, allow_empty=True,
        help="L3 routed: this node's relay address (UDP) other nodes reach it on ('' = off)",
    )
    relay_advertise: str = setting(
        "", kind=PEER, allow_empty=True,
        help="L3 routed: the relay address announced to the other nodes ('' = relay_listen)",
    )
    routed_vip: str = setting(
        "", help="L3 routed: the cluster's return address (IPv4) the pools are routed to; one "
        "node holds it at a time ('' = none: the outside routes the pools to every node)",
    )
    routed_vip6: str = setting(
        "", help="L3 routed: the cluster's IPv6 return address the IPv6 pool is routed to; "
        "held with routed_vip ('' = none: IPv6 return traffic is not routed to the cluster)",
    )
    routed_vip_interface: str = setting(
        "", help="L3 routed: the interface the holder announces routed_vip on (gratuitous ARP) "
        "and answers neighbour solicitations for routed_vip6 on",
    )
    routed_lease_s: float = setting(
        1.0, min=0.1, max=60.0, help="L3 routed: the return address's lease in the store",
    )
    events: EventsConfig = setting(default_factory=EventsConfig)
    log_level: str = setting("INFO", choices=LOG_LEVELS, fold_case=True)
    log_format: str = setting("text", choices=("text", "json"), fold_case=True,
                              help="ordinary logs on stderr: text, or ECS JSON lines")
    data_plane: str = setting(
        "auto", choices=("auto", "compiled", "python"), fold_case=True,
        help="who seals and opens DATA packets: the compiled module (jvpn_dataplane), the "
        "Python reference, or auto (compiled when installed); said at start",
    )
    udp_engine: str = setting(
        "auto", choices=("auto", "on", "off"), fold_case=True,
        help="the compiled UDP data path: a Rust thread reads the UDP socket and the upstreams "
        "in batches and forwards plain DATA itself (needs the compiled data plane; behind "
        "trusted_balancers it reads their client-address prefixes too); auto = on when "
        "possible; said at start",
    )
    gc_gen0_threshold: int = setting(
        20_000, min=0, max=10_000_000,
        help="allocations between young-generation GC passes (process-wide, set by "
        "jvpn-gateway); 0 = leave the interpreter's thresholds",
    )
    trusted_balancers: list[str] = setting(
        [], help="addresses or networks (CIDR) of the load balancers whose client-address "
        "prefix (UDP, deploy/nginx/jvpn.js) and PROXY v1 header (TCP) are believed; from them "
        "a message without one is dropped, from anyone else one with one is; [] = believe none",
    )
    store_tls_ca_file: str = setting(
        "", help="CA bundle a rediss:// store_url's server certificate is verified against "
        "('' = the system's); the ACL user and password go in the URL (rediss://user:pw@host)",
    )
    admin_advertise: str = setting(
        "", kind=PEER, allow_empty=True,
        help="host:port at which `jvpn status` reaches this node's admin port, registered in "
        "the store ('' = the admin address, a wildcard host replaced by this host's name)",
    )
    status_token: str = setting(
        "", allow_empty=True, secret=True,
        help="bearer token /status requires; '' = /status answers loopback only",
    )
    status_token_file: str = setting("", help="file holding status_token")
    node_ttl_s: float = setting(
        15.0, min=1.0, max=3600.0,
        help="how long a node's registration outlives its last renewal (renewed every third)",
    )

    def check_config(self) -> Iterator[tuple[str, str]]:
        """Cross-field rules: (key, problem) for each violation."""
        if self.private_key and self.private_key_file:
            yield "private_key", "set private_key or private_key_file, not both"
        if self.kek and self.kek_file:
            yield "kek", "set kek or kek_file, not both"
        if self.status_token and self.status_token_file:
            yield "status_token", "set status_token or status_token_file, not both"
        if (self.kek_previous or self.kek_previous_files) and not (self.kek or self.kek_file):
            yield "kek_previous", "previous KEKs need the current one (kek or kek_file)"
        if self.admin and self.listen_tcp and _same_port(self.admin, self.listen_tcp):
            yield "admin", f"clashes with listen_tcp {self.listen_tcp}"
        if self.sweep_interval_s > self.tombstone_ttl_s:
            yield "sweep_interval_s", "must not exceed tombstone_ttl_s"
        if self.tcp_idle_timeout_s <= 3 * self.keepalive_interval_s:  # clients are told it
            yield "tcp_idle_timeout_s", "must exceed 3 x keepalive_interval_s"
        if self.quic_idle_timeout_s <= 3 * self.keepalive_interval_s:
            yield "quic_idle_timeout_s", "must exceed 3 x keepalive_interval_s"
        if bool(self.quic_cert_file) != bool(self.quic_key_file):
            yield "quic_cert_file", "set quic_cert_file and quic_key_file together"
        if self.listen_quic and self.listen_udp and _same_port(self.listen_quic, self.listen_udp):
            yield "listen_quic", f"clashes with listen_udp {self.listen_udp}"
        if bool(self.inner_pool_v4) != bool(self.inner_pool_v6):
            yield "inner_pool_v4", "set inner_pool_v4 and inner_pool_v6 together"
        if self.inner_pool_v4:
            try:
                InnerPool.parse(self.inner_pool_v4, self.inner_pool_v6)
            except ValueError as exc:
                yield "inner_pool_v4", str(exc)
        if self.egress == "routed" and self.inner_pool_v4 and not self.relay_listen:
            yield "relay_listen", "routed egress needs a relay address"
        if self.routed_vip:
            try:
                ipaddress.IPv4Address(self.routed_vip)
            except ValueError:
                yield "routed_vip", f"{self.routed_vip!r} is not an IPv4 address"
            if not self.routed_vip_interface:
                yield "routed_vip_interface", "routed_vip needs the interface to announce it on"
        if self.routed_vip6:
            try:
                ipaddress.IPv6Address(self.routed_vip6)
            except ValueError:
                yield "routed_vip6", f"{self.routed_vip6!r} is not an IPv6 address"
            if not self.routed_vip:
                yield "routed_vip6", "routed_vip6 is held with routed_vip: set both"
        for item in self.trusted_balancers:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                yield "trusted_balancers", f"{item!r} is not an IP address or network"


def load_gateway_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> GatewayConfig:
    """Load the gateway config; raise ConfigError naming the bad key and its source."""
    cfg = load_component(GatewayConfig, "gateway", ENV_PREFIX, CONFIG_ENV, path,
                         os.environ if env is None else env, overrides)
    if not cfg.node_id:
        cfg = replace(cfg, node_id=default_node_id(cfg.listen_udp))
    return cfg


def default_node_id(listen_udp: str) -> str:
    """``<hostname>-<udp port>``: unique per host and listener, stable across restarts."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "node"
    port = parse_address(listen_udp)[1]
    return f"{host[:56]}-{port}"


def read_key(inline: str, path: str, key: str) -> bytes | None:
    """The 32-byte key given inline or in file ``path`` (hex or base64); None if neither."""
    return read_key_setting(inline, path, "gateway", key)


def load_private_key(cfg: GatewayConfig) -> bytes | None:
    """The gateway's static X25519 private key, or None if not configured."""
    return read_key(cfg.private_key, cfg.private_key_file, "private_key_file")


def load_kek(cfg: GatewayConfig) -> bytes | None:
    """The cluster key-encryption key, or None if not configured."""
    return read_key(cfg.kek, cfg.kek_file, "kek_file")


def load_previous_keks(cfg: GatewayConfig) -> list[bytes]:
    """The previous KEKs of a rotation (kek_previous, then kek_previous_files), each file
    checked as kek_file is."""
    keks = [read_key(inline, "", "kek_previous") for inline in cfg.kek_previous]
    keks += [read_key("", path, "kek_previous_files") for path in cfg.kek_previous_files]
    return [k for k in keks if k is not None]


def load_status_token(cfg: GatewayConfig) -> str:
    """The /status bearer token ('' = loopback only), inline or from its file."""
    if cfg.status_token_file:
        with open(cfg.status_token_file, encoding="utf-8") as fp:
            return fp.read().strip()
    return cfg.status_token


def _same_port(a: str, b: str) -> bool:
    (ha, pa), (hb, pb) = parse_address(a), parse_address(b)
    return pa == pb != 0 and (ha == hb or "0.0.0.0" in (ha, hb) or "::" in (ha, hb))
