"""What every command line of the project shares: ``--version`` on every command, and a
bare command group (``jvpn``, ``jvpn sessions``) printing its help instead of an error."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

DISTRIBUTION = "jumping-vpn"
HELP_OF = "_help_of"  # the namespace attribute naming the deepest command group reached


def version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return _dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it, each once."""
    seen: set[int] = set()
    todo = [parser]
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` to every command and let a bare command group print its help
    (see ``help_requested``)."""
    text = f"{parser.prog} {version()}"
    for p in walk(parser):
        if p.add_help and not any("--version" in a.option_strings for a in p._actions):
            p.add_argument("--version", action="version", version=text,
                           help="print the version and exit")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.required = False
                p.set_defaults(**{HELP_OF: p})
    return parser


def help_requested(args: argparse.Namespace, has_command: bool) -> int | None:
    """If no command was reached (a bare group), print that group's help and return 0."""
    if has_command:
        return None
    group = getattr(args, HELP_OF, None)
    if group is None:
        return None
    group.print_help()
    return 0


LOG_FORMATS = ("text", "json")


def add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="text (default) or json: one ECS JSON object per line (ecs-logging)")


def configure_logging(level: str, fmt: str, service: str, node: str = "") -> None:
    """Ordinary logs to stderr: text, or ECS JSON lines (``log.level``, ``message``,
    ``service.name``, ``service.node.name``) that a log shipper reads as they are."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        import ecs_logging

        handler.setFormatter(ecs_logging.StdlibFormatter(exclude_fields=["process"]))
        handler.addFilter(_ServiceFields(service, node))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class _ServiceFields(logging.Filter):
    """Adds ECS ``service.*`` to every record (dotted extras nest in ecs-logging's output)."""

    def __init__(self, service: str, node: str) -> None:
        super().__init__()
        self.fields = {"service.name": service}
        if node:
            self.fields["service.node.name"] = node

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            setattr(record, k, v)
        return True
