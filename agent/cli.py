"""``jvpn-agent``: run one agent, or print its status."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from agent import udp_engine
from agent.agent import Agent, AgentSettings
from agent.config import AgentConfig, gateway_public_key, load_agent_config, load_private_key
from agent.l3 import L3Settings
from netdev.netconf import FullTunnel
from session import dataplane
from session.client import ClientParams
from session.quality import QualityThresholds
from settings import ConfigError, parse_address, parse_set_flags
from settings.cli import add_log_format, configure_logging, finish_parser


def settings_from_config(cfg: AgentConfig, name: str = "agent") -> AgentSettings:
    """Turn a validated AgentConfig into what the Agent runs on."""
    priv = load_private_key(cfg)
    pub = gateway_public_key(cfg)
    if priv is None:
        raise ConfigError("config error: [agent] private_key: required (or private_key_file)",
                          key="private_key")
    if pub is None:
        raise ConfigError("config error: [agent] gateway_public_key: required (the pinned key)",
                          key="gateway_public_key")
    params = ClientParams(
        keepalive_interval=cfg.keepalive_interval_s,
        dead_after=cfg.dead_after_keepalives,
        probe_silence=cfg.probe_silence_s,
        handshake_timeout=cfg.handshake_timeout_s,
        reattach_timeout=cfg.reattach_timeout_s,
        reattach_retries=cfg.reattach_retries,
        backoff_initial=cfg.backoff_initial_s,
        backoff_max=cfg.backoff_max_s,
        refusals_final=cfg.refusals_final,
        upstream=cfg.upstream,
        rekey_after=cfg.rekey_after_s,
        reject_after=cfg.reject_after_s,
        thresholds=QualityThresholds(
            volatile_loss_pct=cfg.volatile_loss_pct, volatile_rtt_ms=cfg.volatile_rtt_ms,
            volatile_jitter_ms=cfg.volatile_jitter_ms, degraded_loss_pct=cfg.degraded_loss_pct,
            degraded_rtt_ms=cfg.degraded_rtt_ms,
        ),
    )
    return AgentSettings(
        private_key=priv, gateway_public_key=pub,
        gateways=[parse_address(a) for a in cfg.gateways],
        tcp_gateways=[parse_address(a) for a in cfg.tcp_gateways],
        quic_gateways=[parse_address(a) for a in cfg.quic_gateways],
        upstream=cfg.upstream, local_udp=parse_address(cfg.local_udp),
        transports=list(cfg.transports), params=params, name=name,
        l3=L3Settings(cfg.tun_name, cfg.path_mtu,
                      FullTunnel(cfg.full_tunnel_table, cfg.full_tunnel_table,
                                 cfg.full_tunnel_priority), cfg.tun_offload)
        if cfg.mode == "l3" else None,
        engine=_engine_wanted(cfg),
        records_file=cfg.records_file or None,
    )


def _engine_wanted(cfg: AgentConfig) -> bool:
    """Whether the agent's UDP data path runs in the compiled engine (``udp_engine``)."""
    if cfg.udp_engine == "off":
        return False
    why = ""
    if dataplane.active() is not dataplane.DataPlane.COMPILED:
        why = "the data plane is not the compiled one"
    elif not udp_engine.available():
        why = "the compiled module has no engine"
    if why and cfg.udp_engine == "on":
        raise LookupError(f"udp_engine = on, but {why}")
    return not why


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jvpn-agent",
        description="Jumping VPN agent: keeps one session while its transport jumps. "
        "Datagrams sent to the local UDP port travel through the session to the upstream.",
        epilog="Configuration: defaults < TOML file ([agent] table) < JVPN_AGENT_* environment "
        "< flags. Example: jvpn-agent --config agent.toml --set keepalive_interval_s=0.25",
    )
    p.add_argument("--config", "-c", help="TOML file with an [agent] table (or $JVPN_AGENT_CONFIG)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set upstream=127.0.0.1:9000")
    p.add_argument("--gateway", action="append", help="gateway UDP host:port (repeatable)")
    p.add_argument("--tcp-gateway", action="append", help="gateway TCP host:port (repeatable)")
    p.add_argument("--quic-gateway", action="append", help="gateway QUIC host:port (repeatable)")
    p.add_argument("--gateway-public-key", help="pinned gateway public key (hex or base64)")
    p.add_argument("--private-key-file", help="file holding this agent's private key")
    p.add_argument("--upstream", help="upstream host:port the gateway forwards to")
    p.add_argument("--local-udp", help="local UDP host:port for applications")
    p.add_argument("--transports", help="comma-separated preference, e.g. udp,quic,tcp")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    add_log_format(p)
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds (0 = until SIGINT/SIGTERM)")
    p.add_argument("--status-json", action="store_true",
                   help="print each status line as JSON instead of text")
    return finish_parser(p)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    out = parse_set_flags(args.set)
    for flag, key in (("gateway", "gateways"), ("tcp_gateway", "tcp_gateways"),
                      ("quic_gateway", "quic_gateways"),
                      ("gateway_public_key", "gateway_public_key"),
                      ("private_key_file", "private_key_file"), ("upstream", "upstream"),
                      ("local_udp", "local_udp"), ("transports", "transports"),
                      ("log_level", "log_level"), ("log_format", "log_format")):
        val = getattr(args, flag)
        if val is not None:
            out[key] = ",".join(val) if isinstance(val, list) else val
    return out


async def run(cfg: AgentConfig, duration: float, as_json: bool) -> int:
    agent = Agent(settings_from_config(cfg))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _run(agent, cfg, stop, duration, as_json)
    finally:
        await agent.stop()  # also on SIGTERM and errors: the L3 interface's state goes


async def _run(agent: Agent, cfg: AgentConfig, stop: asyncio.Event, duration: float,
               as_json: bool) -> int:
    loop = asyncio.get_running_loop()
    await agent.start()
    if agent.l3 is not None:
        print(f"L3 interface: {cfg.tun_name} mtu {agent.l3.mtu}", flush=True)
    else:
        print(f"local UDP port: {agent.local_address}", flush=True)
    deadline = loop.time() + duration if duration > 0 else None
    interval = cfg.status_interval_s or 3600.0
    while not stop.is_set() and not agent.finished.is_set():
        timeout = interval if deadline is None else min(interval, max(0.0, deadline - loop.time()))
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except TimeoutError:
            pass
        if cfg.status_interval_s:
            print(json.dumps(agent.status()) if as_json else agent.status_line(), flush=True)
        if deadline is not None and loop.time() >= deadline:
            break
    await agent.stop()
    return exit_code(agent)


EXIT_REFUSED = 3  # the cluster refused this client for good: the message says what to fix
EXIT_NEVER_ATTACHED = 1


def exit_code(agent: Agent) -> int:
    """0 only for an agent that attached and was not refused for good; the reason on stderr."""
    refused = agent.machine.refused
    if refused is not None:
        print(f"jvpn-agent: refused by the gateway ({refused.reason.name}, authenticated, "
              f"{refused.attempts} times): {refused.advice}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    if not agent.ever_attached:
        print("jvpn-agent: never attached: no handshake completed (check --gateway, "
              "the pinned gateway public key, the network and the gateway's logs)", file=sys.stderr, flush=True)
        return EXIT_NEVER_ATTACHED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_agent_config(args.config, overrides=overrides_from_args(args))
        dataplane.select(cfg.data_plane)
        settings_from_config(cfg)  # fail fast on missing keys (and an impossible udp_engine)
    except LookupError as exc:
        print(f"config error: [agent] {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, cfg.log_format, "jvpn-agent")
    logging.getLogger("jvpn.agent").info("%s", dataplane.describe())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(cfg, args.duration, args.status_json))


if __name__ == "__main__":
    sys.exit(main())
