"""Every command line: --version on every command, help text on every argument, a bare
command group prints its help instead of failing."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from settings.cli import version, walk


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from agent.cli import build_parser as agent
    from gateway.cli import build_parser as gateway
    from instruments.bench import build_parser as bench
    from instruments.cli import build_parser as lab
    from jvpn.cli import build_parser as jvpn

    return {"jvpn": jvpn, "jvpn-gateway": gateway, "jvpn-agent": agent, "jvpn-lab": lab,
            "jvpn-lab bench": bench}


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_argument_has_help_and_every_command_a_version(name: str) -> None:
    root = _parsers()[name]()
    missing = []
    for p in walk(root):
        opts = [a for a in p._actions if not isinstance(a, argparse._SubParsersAction)]
        # jvpn-lab answers `jvpn-lab bench --version` itself (bench parses the rest).
        if name != "jvpn-lab bench" and p.add_help:
            assert any("--version" in a.option_strings for a in opts), p.prog
        missing += [f"{p.prog} {a.dest}" for a in opts if not a.help]
    assert missing == []


def test_version_and_bare_groups(capsys: pytest.CaptureFixture[str]) -> None:
    from jvpn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sessions", "--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"jvpn {version()}"
    for argv in ([], ["sessions"], ["clients"], ["audit"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: jvpn") and "ACTION" in out or "COMMAND" in out, argv


def test_lab_passthrough_commands_answer_version(capsys: pytest.CaptureFixture[str]) -> None:
    from instruments.cli import main

    assert main(["bench", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jvpn-lab bench {version()}"


def test_session_id_prefixes_resolve_or_say_why_not() -> None:
    from jvpn.status import StatusError, resolve_prefix

    ids = [bytes.fromhex("ab" * 16), bytes.fromhex("abcd" + "00" * 14), bytes.fromhex("12" * 16)]
    assert resolve_prefix("12", ids) == ids[2]
    assert resolve_prefix("ABCD", ids) == ids[1]
    for bad, why in (("ab", "ambiguous"), ("99", "no session id starts with"),
                     ("xyz", "not a hex"), ("0" * 33, "longer than")):
        with pytest.raises(StatusError, match=why):
            resolve_prefix(bad, ids)


def test_status_without_token_answers_loopback_only() -> None:
    from gateway.status import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("127.8.0.2")
    assert not _loopback("10.0.0.1") and not _loopback("") and not _loopback(None)


def test_json_logs_are_ecs_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from settings.cli import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", "json", "jvpn-gateway", "gw-1")
        logging.getLogger("jvpn.gateway").warning("store unreachable: %s", "refused")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert line["log.level"] == "warning" and line["message"] == "store unreachable: refused"
    assert line["service"] == {"name": "jvpn-gateway", "node": {"name": "gw-1"}}
    assert "@timestamp" in line and line["log"]["logger"] == "jvpn.gateway"
