"""``jvpn-lab``: the lab instruments' entry point (demo, benchmarks, local cluster).

``demo``, ``bench`` and ``bench-cluster`` hand the rest of the command line to
their module's own parser; ``cluster`` is the local cluster launcher. Each
module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from settings.cli import finish_parser, help_requested, version

# command -> (module, one-line help); the module's main(argv) parses the rest.
PASSTHROUGH = {
    "demo": ("instruments.demo", "agents keep their sessions while their transports jump "
                                 "(self-contained, bounded)"),
    "bench": ("instruments.bench", "one gateway's figures beside same-run baselines"),
    "bench-cluster": ("instruments.bench_cluster", "cluster figures: 1-3 gateways behind nginx, "
                                                   "node death, WAIT"),
}


def build_parser() -> argparse.ArgumentParser:
    from instruments.cluster import add_cluster_parser

    p = argparse.ArgumentParser(
        prog="jvpn-lab", description="Jumping VPN lab instruments: demo, benchmarks and a "
        "local cluster on loopback. `jvpn-lab COMMAND --help` for each.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)
    add_cluster_parser(sub)
    return finish_parser(p)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        if argv[1:] == ["--version"]:
            print(f"jvpn-lab {argv[0]} {version()}")
            return 0
        module = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return int(module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    bare = help_requested(args, hasattr(args, "fn"))
    if bare is not None:
        return bare
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
