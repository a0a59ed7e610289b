"""Agent configuration: ``[agent]`` in a TOML file, ``JVPN_AGENT_*`` env, flags.

Precedence is defaults < TOML < env < flags (see ``settings``). The
file is ``path``, else ``$JVPN_AGENT_CONFIG``, else none. Lists in env are
comma-separated: ``JVPN_AGENT_GATEWAYS=10.0.0.1:51820,10.0.0.2:51820``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from settings import (
    ADDRESS,
    KEY32,
    PEER,
    decode_key,
    load_component,
    read_key_setting,
    setting,
)

ENV_PREFIX = "JVPN_AGENT_"
CONFIG_ENV = "JVPN_AGENT_CONFIG"
TRANSPORTS = ("udp", "tcp", "quic")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Settings of one agent (client)."""

    gateways: list[str] = setting(["127.0.0.1:51820"], kind=PEER, min_items=1, help="UDP")
    tcp_gateways: list[str] = setting([], kind=PEER, help="[] = same as gateways")
    quic_gateways: list[str] = setting(
        [], kind=PEER, help="QUIC listeners of the gateways (listen_quic); [] = no QUIC candidate"
    )
    gateway_public_key: str = setting("", kind=KEY32, allow_empty=True, help="pinned cluster key")
    private_key: str = setting("", kind=KEY32, allow_empty=True, secret=True)
    private_key_file: str = setting("")
    local_udp: str = setting("127.0.0.1:0", kind=ADDRESS, help="local app-facing UDP socket")
    upstream: str = setting("", kind=PEER, allow_empty=True, help="where the gateway forwards")
    transports: list[str] = setting(
        ["udp", "quic", "tcp"],
        choices=TRANSPORTS,
        fold_case=True,
        min_items=1,
        unique=True,
        help="order of preference",
    )
    keepalive_interval_s: float = setting(0.5, min=0.01, max=3600.0)
    dead_after_keepalives: int = setting(3, min=1, max=1000)
    probe_silence_s: float = setting(
        0.25, min=0.0, max=60.0,
        help="data sent and nothing heard this long (+4 RTTs): probe at once, and the path is "
        "lost after as long again; 0 = off (dead_after_keepalives alone)",
    )
    handshake_timeout_s: float = setting(1.0, min=0.01, max=120.0)
    reattach_timeout_s: float = setting(0.5, min=0.01, max=120.0)
    reattach_retries: int = setting(3, min=0, max=100,
                                    help="retransmissions on one path before the next one")
    backoff_initial_s: float = setting(0.1, min=0.001, max=3600.0)
    backoff_max_s: float = setting(5.0, min=0.001, max=3600.0)
    rekey_after_s: float = setting(
        120.0, min=0.1, max=86400.0,
        help="a fresh Diffie-Hellman (REKEY) after this long under one session secret")
    reject_after_s: float = setting(
        180.0, min=0.2, max=86400.0,
        help="send nothing under a session secret older than this (the gateway drops it)")
    refusals_final: int = setting(5, min=1, max=1000,
                                  help="authenticated refusals in a row that end the agent")
    volatile_loss_pct: float = setting(5.0, min=0.0, max=100.0)
    volatile_rtt_ms: float = setting(300.0, min=0.0, max=600_000.0)
    volatile_jitter_ms: float = setting(50.0, min=0.0, max=600_000.0)
    degraded_loss_pct: float = setting(20.0, min=0.0, max=100.0)
    degraded_rtt_ms: float = setting(1000.0, min=0.0, max=600_000.0)
    mode: str = setting(
        "udp", choices=("udp", "l3"),
        help="udp: datagrams to local_udp go to the upstream; l3: a TUN interface with the "
        "session's inner addresses and routes (needs CAP_NET_ADMIN)",
    )
    tun_name: str = setting("jvpn0", help="L3: the TUN interface's name")
    tun_offload: bool = setting(
        True, help="L3 with the compiled engine: the TUN hands over and takes TCP "
        "super-packets (IFF_VNET_HDR, TSO/GRO; the engine cuts and merges them); said at start",
    )
    path_mtu: int = setting(
        1500, min=1400, max=9000,
        help="L3: the outer path's MTU; the TUN's MTU is derived from it and the transports",
    )
    full_tunnel_table: int = setting(
        51820, min=1, max=2**31 - 1,
        help="L3 full tunnel: routing table and firewall mark (the gateway path stays outside)",
    )
    full_tunnel_priority: int = setting(
        5200, min=1, max=32000, help="L3 full tunnel: priority of its two policy-routing rules",
    )
    status_interval_s: float = setting(1.0, min=0.0, max=3600.0, help="0 = no status output")
    records_file: str = setting("", help="append epoch installs and stale-epoch drops (JSONL)")
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
        help="the compiled data path: a Rust thread reads the local port (L3: the TUN) and "
        "the UDP paths in batches and forwards plain payloads itself (needs the compiled "
        "data plane); auto = on when possible, in both modes (UDP-forward mode's flows, "
        "one per local source, included); said at start",
    )

    def check_config(self) -> Iterator[tuple[str, str]]:
        """Cross-field rules: (key, problem) for each violation."""
        if self.private_key and self.private_key_file:
            yield "private_key", "set private_key or private_key_file, not both"
        if self.backoff_initial_s > self.backoff_max_s:
            yield "backoff_initial_s", "must not exceed backoff_max_s"
        if self.degraded_loss_pct < self.volatile_loss_pct:
            yield "degraded_loss_pct", "must be >= volatile_loss_pct"
        if not 0 < len(self.tun_name.encode()) < 16:
            yield "tun_name", "must be 1-15 bytes"
        if self.degraded_rtt_ms < self.volatile_rtt_ms:
            yield "degraded_rtt_ms", "must be >= volatile_rtt_ms"


def load_agent_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Load the agent config; raise ConfigError naming the bad key and its source."""
    cfg = load_component(AgentConfig, "agent", ENV_PREFIX, CONFIG_ENV, path,
                         os.environ if env is None else env, overrides)
    if not cfg.tcp_gateways:
        cfg = replace(cfg, tcp_gateways=list(cfg.gateways))
    return cfg


def load_private_key(cfg: AgentConfig) -> bytes | None:
    """The agent's static X25519 private key (inline or from its file), or None."""
    return read_key_setting(cfg.private_key, cfg.private_key_file, "agent", "private_key_file")


def gateway_public_key(cfg: AgentConfig) -> bytes | None:
    """The pinned gateway cluster public key, or None if not configured."""
    return decode_key(cfg.gateway_public_key) if cfg.gateway_public_key else None
