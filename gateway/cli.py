"""``jvpn-gateway``: run one gateway node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from gateway.app import GatewayApp, resolve_keys, tune_gc
from gateway.config import GatewayConfig, load_gateway_config
from session import dataplane
from settings import ConfigError, parse_set_flags
from settings.cli import add_log_format, configure_logging, finish_parser

FLAGS = (  # (flag attribute, config key)
    ("node_id", "node_id"), ("listen_udp", "listen_udp"), ("listen_tcp", "listen_tcp"),
    ("admin", "admin"), ("store_url", "store_url"), ("private_key_file", "private_key_file"),
    ("kek_file", "kek_file"), ("log_level", "log_level"), ("log_format", "log_format"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jvpn-gateway",
        description="Jumping VPN gateway node: terminates UDP and TCP transports, runs every "
        "session mutation as a Lua CAS on Redis. With no store URL it starts its own "
        "redis-server child (development only).",
        epilog="Configuration: defaults < TOML file ([gateway] table) < JVPN_GATEWAY_* "
        "environment < flags. Example: jvpn-gateway -c gateway.toml --set keepalive_interval_s=0.5",
    )
    p.add_argument("--config", "-c", help="TOML file with a [gateway] table (or $JVPN_GATEWAY_CONFIG)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable); nested keys as events.file=...")
    p.add_argument("--node-id", help="this node's id (default <hostname>-<udp port>)")
    p.add_argument("--listen-udp", help="UDP host:port (default 127.0.0.1:51820)")
    p.add_argument("--listen-tcp", help="TCP host:port ('' disables)")
    p.add_argument("--admin", help="admin HTTP host:port for /metrics /healthz /readyz")
    p.add_argument("--store-url", help="redis://host:port/db ('' = embedded redis-server)")
    p.add_argument("--private-key-file", help="gateway static private key file (hex or base64)")
    p.add_argument("--kek-file", help="cluster key-encryption key file (hex or base64)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    add_log_format(p)
    p.add_argument("--print-public-key", action="store_true",
                   help="print the public key for the configured private key and exit")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print it (secrets redacted) and exit")
    return finish_parser(p)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    out = parse_set_flags(args.set)
    for attr, key in FLAGS:
        val = getattr(args, attr)
        if val is not None:
            out[key] = val
    return out


async def run(cfg: GatewayConfig) -> int:
    app = GatewayApp(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except Exception as exc:
        logging.getLogger("jvpn.gateway").error("gateway failed to start: %s", exc)
        await app.stop()
        return 1
    await stop.wait()
    await app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_gateway_config(args.config, overrides=overrides_from_args(args))
        keys = resolve_keys(cfg)
        dataplane.select(cfg.data_plane)
    except LookupError as exc:
        print(f"config error: [gateway] {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.print_public_key:
        print(keys.public.hex())
        return 0
    if args.check_config:
        import json

        from settings import config_as_dict

        print(json.dumps(config_as_dict(cfg, redact=True), indent=2))
        return 0
    configure_logging(cfg.log_level, cfg.log_format, "jvpn-gateway", cfg.node_id)
    tune_gc(cfg)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
