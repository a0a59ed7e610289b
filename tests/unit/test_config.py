"""Config loading: precedence, strict validation, and errors that name key and source."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

import pytest

from agent.config import AgentConfig, load_agent_config
from agent.config import load_private_key as agent_private_key
from gateway.config import (
    GatewayConfig,
    load_gateway_config,
    load_kek,
    load_private_key,
)
from settings import (
    ADDRESS,
    KEY32,
    PEER,
    ConfigError,
    config_as_dict,
    decode_key,
    env_var_name,
    load_config,
    parse_address,
    parse_toml,
    redact_url,
    select_section,
    setting,
)

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
KEY_B64 = base64.b64encode(KEY).decode()


@dataclass(frozen=True)
class Inner:
    file: str = setting("")
    size: int = setting(10, min=1, max=100)


@dataclass(frozen=True)
class Sample:
    name: str = setting("default")
    count: int = setting(3, min=0, max=10)
    ratio: float = setting(0.5, min=0.0, max=1.0)
    enabled: bool = setting(False)
    peers: list[str] = setting(["127.0.0.1:1"], kind=PEER)
    bind: str = setting("127.0.0.1:0", kind=ADDRESS, allow_empty=True)
    limit: int | None = setting(None, min=1)
    key: str = setting("", kind=KEY32, allow_empty=True, secret=True)
    inner: Inner = setting(default_factory=Inner)


def load(toml=None, env=None, flags=None) -> Sample:
    return load_config(
        Sample, toml, env or {}, "T_", flags or {}, section="sample", source="s.toml"
    )


def error(toml=None, env=None, flags=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(toml, env, flags)
    return info.value


# ---- precedence -------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load()
    assert cfg == Sample()
    assert cfg.peers == ["127.0.0.1:1"] and cfg.limit is None


def test_precedence_defaults_toml_env_flags() -> None:
    toml = {"name": "toml", "count": 4, "inner": {"size": 20, "file": "t"}}
    assert load(toml).name == "toml"
    env = {"T_NAME": "env", "T_INNER__SIZE": "30"}
    cfg = load(toml, env)
    assert (cfg.name, cfg.count, cfg.inner.size, cfg.inner.file) == ("env", 4, 30, "t")
    cfg = load(toml, env, {"name": "flag", "inner.size": 40, "count": None})
    assert (cfg.name, cfg.count, cfg.inner.size) == ("flag", 4, 40)


def test_flag_key_spellings_and_string_values() -> None:
    cfg = load(flags={"inner__size": "7", "--count": "2", "enabled": "yes"})
    assert (cfg.inner.size, cfg.count, cfg.enabled) == (7, 2, True)
    assert load(flags={"inner": {"size": 9}}).inner.size == 9


def test_env_types() -> None:
    cfg = load(
        env={
            "T_COUNT": " 7 ",
            "T_RATIO": "0.25",
            "T_ENABLED": "on",
            "T_PEERS": "10.0.0.1:5, [::1]:6,",
            "T_LIMIT": "5",
        }
    )
    assert (cfg.count, cfg.ratio, cfg.enabled, cfg.limit) == (7, 0.25, True, 5)
    assert cfg.peers == ["10.0.0.1:5", "[::1]:6"]
    assert load(env={"T_LIMIT": ""}, flags={}).limit is None
    assert load(env={"T_ENABLED": "0"}).enabled is False


def test_int_accepted_for_float_in_toml() -> None:
    assert load({"ratio": 1}).ratio == 1.0


def test_env_without_prefix_is_ignored() -> None:
    assert load(env={"OTHER": "x", "T": "y"}) == Sample()


# ---- errors name the key and the source -------------------------------------------------


def test_toml_type_error_message() -> None:
    @dataclass(frozen=True)
    class Gw:
        keepalive_interval_s: float = setting(1.0)

    with pytest.raises(ConfigError) as info:
        load_config(
            Gw, {"keepalive_interval_s": "fast"}, {}, "X_", {},
            section="gateway", source="gateway.toml",
        )  # fmt: skip
    assert str(info.value) == (
        "config error: [gateway] keepalive_interval_s (from gateway.toml): "
        'expected a number, got "fast"'
    )
    assert info.value.key == "keepalive_interval_s"
    assert info.value.source == "gateway.toml"


@pytest.mark.parametrize(
    ("toml", "env", "flags", "where", "source", "problem"),
    [
        ({"count": "x"}, None, None, "[sample] count", "from s.toml", "expected an integer"),
        ({"count": 1.5}, None, None, "[sample] count", "from s.toml", "expected an integer"),
        ({"enabled": 1}, None, None, "[sample] enabled", "from s.toml", "expected true or false"),
        ({"name": 5}, None, None, "[sample] name", "from s.toml", "expected a string"),
        ({"peers": "a:1"}, None, None, "[sample] peers", "from s.toml", "expected a list"),
        ({"peers": ["a:1", 2]}, None, None, "[sample] peers", "from s.toml", "item 1 is 2"),
        ({"inner": 3}, None, None, "[sample] inner", "from s.toml", "expected a table"),
        ({"inner": {"size": "x"}}, None, None, "[sample.inner] size", "from s.toml", "integer"),
        (None, {"T_COUNT": "many"}, None, "[sample] count", "from env T_COUNT", "integer"),
        (None, {"T_RATIO": "nan"}, None, "[sample] ratio", "from env T_RATIO", "finite"),
        (None, {"T_ENABLED": "maybe"}, None, "[sample] enabled", "from env T_ENABLED", "true"),
        (None, {"T_INNER__SIZE": "x"}, None, "[sample.inner] size", "from env T_INNER__SIZE", "integer"),
        (None, None, {"count": "x"}, "[sample] count", "from flag --count", "integer"),
        (None, None, {"count": True}, "[sample] count", "from flag --count", "integer"),
        (None, None, {"inner.size": 0}, "[sample.inner] size", "from flag --inner-size", "range"),
    ],
)  # fmt: skip
def test_every_error_names_key_and_source(toml, env, flags, where, source, problem) -> None:
    msg = str(error(toml, env, flags))
    assert msg.startswith(f"config error: {where} ({source}): "), msg
    assert problem in msg


def test_overridden_layer_is_still_validated() -> None:
    err = error({"count": "x"}, {"T_COUNT": "2"})
    assert "(from s.toml)" in str(err)


def test_unknown_keys() -> None:
    err = error({"cuont": 1})
    assert str(err) == (
        "config error: [sample] cuont (from s.toml): unknown key (did you mean count?)"
    )
    assert "[sample.inner] sise (from s.toml): unknown key" in str(error({"inner": {"sise": 1}}))
    err = error(env={"T_INNER__NOPE": "1"})
    assert "[sample.inner] nope (from env T_INNER__NOPE): unknown key" in str(err)
    assert "(from env T_BOGUS): unknown key" in str(error(env={"T_BOGUS": "1"}))
    assert "(from flag --bogus): unknown key" in str(error(flags={"bogus": 1}))
    assert "is a section" in str(error(env={"T_INNER": "x"}))
    assert "is not a section" in str(error(env={"T_COUNT__X": "1"}))


def test_reserved_env_is_ignored() -> None:
    cfg = load_config(Sample, None, {"T_CONFIG": "/x"}, "T_", {}, reserved_env=("T_CONFIG",))
    assert cfg == Sample()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nohost", 'expected "host:port"'),
        (":80", 'expected "host:port"'),
        ("host:", "bad port"),
        ("host:http", "bad port"),
        ("host:70000", "out of range"),
        ("host:0", "out of range 1-65535"),
        ("::1:80", "need brackets"),
        ("[nope]:80", "bad IPv6"),
        ("bad host:80", "bad host"),
    ],
)
def test_bad_address(value: str, problem: str) -> None:
    msg = str(error({"peers": ["ok:1", value]}))
    assert msg.startswith("config error: [sample] peers (from s.toml): item 1: "), msg
    assert problem in msg


def test_bind_address_allows_port_zero_and_empty() -> None:
    assert load({"bind": "0.0.0.0:0"}).bind == "0.0.0.0:0"
    assert load({"bind": ""}).bind == ""
    assert "[sample] bind (from env T_BIND)" in str(error(env={"T_BIND": "x"}))
    assert parse_address("[::1]:51820") == ("::1", 51820)
    assert parse_address("gw-1.example:443", peer=True) == ("gw-1.example", 443)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ({"count": 11}, "[sample] count (from s.toml): 11 is out of range 0..10"),
        ({"count": -1}, "[sample] count (from s.toml): -1 is out of range 0..10"),
        ({"ratio": 1.5}, "[sample] ratio (from s.toml): 1.5 is out of range 0..1"),
        ({"limit": 0}, "[sample] limit (from s.toml): 0 is out of range 1..inf"),
        ({"inner": {"size": 101}}, "[sample.inner] size (from s.toml): 101 is out of range"),
    ],
)
def test_range(toml, needle: str) -> None:
    assert needle in str(error(toml))


def test_secret_values_never_echoed() -> None:
    secret = "not-a-key-but-private"
    msg = str(error({"key": secret}))
    assert "[sample] key (from s.toml)" in msg and secret not in msg
    assert load({"key": KEY_HEX}).key == KEY_HEX
    assert config_as_dict(load({"key": KEY_HEX}))["key"] == "<redacted>"
    assert config_as_dict(load())["inner"] == {"file": "", "size": 10}


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://jvpn:hunter2@redis:6379/0", "redis://jvpn:<redacted>@redis:6379/0"),
        ("rediss://:hunter2@redis:6380", "rediss://:<redacted>@redis:6380"),
        ("redis://hunter2@redis", "redis://<redacted>@redis"),
        ("redis+cluster://u:hunter2@a:7000,b:7001/0", "redis+cluster://u:<redacted>@a:7000,b:7001/0"),
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=<redacted>"),
        ("https://siem.example/in?token=hunter2&src=jvpn&api_key=hunter2#x",
         "https://siem.example/in?token=<redacted>&src=jvpn&api_key=<redacted>#x"),
        ("https://siem.example/in?Authorization=Bearer%20hunter2",
         "https://siem.example/in?Authorization=<redacted>"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("https://siem.example/in?src=jvpn", "https://siem.example/in?src=jvpn"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_check_config_redacts_every_secret(capsys) -> None:
    from gateway import cli

    argv = ["--check-config", "--store-url", "rediss://jvpn-gw:hunter2@redis:6380/0",
            "--set", "events.siem_http=https://siem.example/in?token=hunter3",
            "--set", f"kek={KEY_HEX}", "--set", f"private_key={KEY_HEX}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", "hunter3", KEY_HEX):
        assert secret not in out
    shown = json.loads(out)
    assert shown["store_url"] == "rediss://jvpn-gw:<redacted>@redis:6380/0"
    assert shown["events"]["siem_http"] == "https://siem.example/in?token=<redacted>"
    assert shown["kek"] == shown["private_key"] == "<redacted>"
    assert shown["listen_udp"] == "127.0.0.1:51820"  # the rest stays readable


def test_secret_named_keys_and_urls_are_redacted_in_any_config() -> None:
    @dataclass(frozen=True)
    class Creds:
        store_password: str = setting("")
        api_token: str = setting("")
        client_secret: str = setting("")
        ca_file: str = setting("")
        private_key_file: str = setting("")
        gateway_public_key: str = setting("")
        urls: list[str] = setting([])

    cfg = Creds("p", "t", "s", "/etc/ca.pem", "/etc/key", "pub", ["redis://u:p@h"])
    assert config_as_dict(cfg) == {
        "store_password": "<redacted>", "api_token": "<redacted>", "client_secret": "<redacted>",
        "ca_file": "/etc/ca.pem", "private_key_file": "/etc/key", "gateway_public_key": "pub",
        "urls": ["redis://u:<redacted>@h"],
    }
    assert config_as_dict(cfg, redact=False)["store_password"] == "p"


def test_invalid_url_error_does_not_echo_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_gateway_config(None, {}, {"store_url": "redis://u:hunter2@redis:notaport/0"})
    assert "store_url" in str(info.value) and "hunter2" not in str(info.value)


def test_decode_key() -> None:
    assert decode_key(KEY_HEX) == KEY
    assert decode_key(KEY_B64 + "\n") == KEY
    assert decode_key(base64.urlsafe_b64encode(KEY).decode()) == KEY
    with pytest.raises(ValueError, match="32-byte"):
        decode_key(base64.b64encode(b"short").decode())


def test_env_var_name() -> None:
    assert env_var_name("JVPN_GATEWAY_", "store_url") == "JVPN_GATEWAY_STORE_URL"
    assert env_var_name("JVPN_GATEWAY_", "events.file") == "JVPN_GATEWAY_EVENTS__FILE"


# ---- TOML documents ---------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_toml('[gateway]\nadmin = "x"\nbroken =\n', "gw.toml")
    assert str(info.value).startswith("config error: gw.toml:3: invalid TOML: ")


def test_select_section() -> None:
    doc = {"gateway": {"admin": ""}, "agent": {}}
    assert select_section(doc, "gateway", "f.toml") == {"admin": ""}
    assert select_section({}, "gateway", "f.toml") == {}
    assert select_section(None, "gateway", "f.toml") is None
    with pytest.raises(ConfigError, match=r"admin \(from f.toml\): top-level key"):
        select_section({"admin": "x"}, "gateway", "f.toml")
    with pytest.raises(ConfigError, match=r"\[gatway\] \(from f.toml\): unknown section"):
        select_section({"gatway": {}}, "gateway", "f.toml")


# ---- the gateway and agent configs ------------------------------------------------------


def test_gateway_defaults() -> None:
    cfg = load_gateway_config(None, {}, {})
    assert cfg.listen_udp == "127.0.0.1:51820" and cfg.listen_tcp == "127.0.0.1:51820"
    assert cfg.admin == "127.0.0.1:9100" and cfg.store_url == ""
    assert cfg.keepalive_interval_s == 1.0 and cfg.silence_keepalives == 3
    assert cfg.reattach_window_s == 30.0 and cfg.dual_active_window_s == 2.0
    assert cfg.events.queue_size == 10_000 and cfg.log_level == "INFO"
    assert cfg.node_id.endswith("-51820")  # hostname-based
    assert load_private_key(cfg) is None and load_kek(cfg) is None


def private_file(path, text: str):
    """A key file as `jvpn keys gen --out` writes it: mode 600."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666], ids=oct)
def test_key_and_kek_files_open_to_group_or_others_are_refused(tmp_path, mode: int) -> None:
    for key, loader in (("private_key_file", load_private_key), ("kek_file", load_kek)):
        path = private_file(tmp_path / key, KEY_HEX + "\n")
        cfg = load_gateway_config(None, {}, {key: str(path)})
        assert loader(cfg) == KEY
        path.chmod(mode)
        with pytest.raises(ConfigError) as info:
            loader(cfg)
        assert info.value.key == key
        assert f"[gateway] {key}: {path} is accessible by group or others (mode {mode:04o})" in str(info.value)
        assert KEY_HEX not in str(info.value)
        path.chmod(0o400)  # owner-only read is fine
        assert loader(cfg) == KEY
    agent_key = private_file(tmp_path / "agent.key", KEY_B64)
    cfg = load_agent_config(None, {}, {"private_key_file": str(agent_key)})
    assert agent_private_key(cfg) == KEY
    agent_key.chmod(mode)
    with pytest.raises(ConfigError, match=r"\[agent\] private_key_file: .*chmod 600"):
        agent_private_key(cfg)


def test_generated_key_files_are_accepted(tmp_path) -> None:
    # `jvpn keys gen --out` and `jvpn kek gen --out` write files the gateway loads as they are.
    from jvpn import cli

    key, kek = tmp_path / "gw.key", tmp_path / "kek.key"
    assert cli.main(["keys", "gen", "--out", str(key)]) == 0
    assert cli.main(["kek", "gen", "--out", str(kek)]) == 0
    assert key.stat().st_mode & 0o777 == kek.stat().st_mode & 0o777 == 0o600
    cfg = load_gateway_config(None, {}, {"private_key_file": str(key), "kek_file": str(kek)})
    assert load_private_key(cfg) is not None and load_kek(cfg) is not None


def test_gateway_file_env_flags(tmp_path) -> None:
    path = tmp_path / "gateway.toml"
    key_file = private_file(tmp_path / "kek", KEY_B64 + "\n")
    path.write_text(
        "[gateway]\n"
        'node_id = "gw-a"\n'
        "keepalive_interval_s = 0.5\n"
        f'private_key = "{KEY_HEX}"\n'
        f'kek_file = "{key_file}"\n'
        "[gateway.events]\n"
        'file = "/tmp/ev.jsonl"\n'
        "[agent]\n"
        'gateways = ["127.0.0.1:1"]\n'
    )
    env = {
        "JVPN_GATEWAY_STORE_URL": "redis://127.0.0.1:6390/0",
        "JVPN_GATEWAY_EVENTS__QUEUE_SIZE": "50",
        "JVPN_GATEWAY_LOG_LEVEL": "debug",
    }
    cfg = load_gateway_config(str(path), env, {"events.stdout": True, "node_id": None})
    assert (cfg.node_id, cfg.keepalive_interval_s) == ("gw-a", 0.5)
    assert cfg.store_url == "redis://127.0.0.1:6390/0"
    assert (cfg.events.file, cfg.events.queue_size, cfg.events.stdout) == (
        "/tmp/ev.jsonl",
        50,
        True,
    )
    assert cfg.log_level == "DEBUG"
    assert load_private_key(cfg) == KEY and load_kek(cfg) == KEY
    # The file may also come from $JVPN_GATEWAY_CONFIG.
    assert load_gateway_config(None, {"JVPN_GATEWAY_CONFIG": str(path)}).node_id == "gw-a"


def test_gateway_errors(tmp_path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nkeepalive_interval_s = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load_gateway_config(str(path), {}, {})
    assert str(info.value) == (
        f'config error: [gateway] keepalive_interval_s (from {path}): expected a number, got "fast"'
    )
    with pytest.raises(
        ConfigError, match=r"\[gateway\] store_url \(from env JVPN_GATEWAY_STORE_URL\)"
    ):
        load_gateway_config(None, {"JVPN_GATEWAY_STORE_URL": "http://x"}, {})
    with pytest.raises(
        ConfigError, match=r"\[gateway.events\] siem_http \(from flag --events-siem-http\)"
    ):
        load_gateway_config(None, {}, {"events.siem_http": "ftp://x"})
    with pytest.raises(ConfigError, match=r"\[gateway\] admin \(from flag --admin\): clashes"):
        load_gateway_config(None, {}, {"admin": "127.0.0.1:51820"})
    with pytest.raises(
        ConfigError, match=r"\[gateway\] log_level \(from env JVPN_GATEWAY_LOG_LEVEL\)"
    ):
        load_gateway_config(None, {"JVPN_GATEWAY_LOG_LEVEL": "loud"}, {})
    with pytest.raises(ConfigError, match=r"handshake_retry_threshold .*out of range -1\.\."):
        load_gateway_config(None, {}, {"handshake_retry_threshold": -2})
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path}/missing.toml"):
        load_gateway_config(str(tmp_path / "missing.toml"), {}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nadmin = \n")
    with pytest.raises(ConfigError, match=f"{bad}:2: invalid TOML"):
        load_gateway_config(str(bad), {}, {})
    flat = tmp_path / "flat.toml"
    flat.write_text('admin = ""\n')
    with pytest.raises(ConfigError, match="put it under \\[gateway\\]"):
        load_gateway_config(str(flat), {}, {})
    bad_key = private_file(tmp_path / "key", "zz\n")
    cfg = load_gateway_config(None, {}, {"private_key_file": str(bad_key)})
    with pytest.raises(ConfigError, match=r"\[gateway\] private_key_file: .*32-byte"):
        load_private_key(cfg)


def test_agent_defaults_and_lists() -> None:
    cfg = load_agent_config(None, {}, {})
    assert cfg.gateways == ["127.0.0.1:51820"] and cfg.tcp_gateways == cfg.gateways
    assert cfg.transports == ["udp", "quic", "tcp"] and cfg.local_udp == "127.0.0.1:0"
    assert cfg.quic_gateways == []  # no QUIC address: no QUIC candidate
    assert (cfg.keepalive_interval_s, cfg.dead_after_keepalives) == (0.5, 3)
    assert (cfg.volatile_loss_pct, cfg.degraded_rtt_ms) == (5.0, 1000.0)
    env = {
        "JVPN_AGENT_GATEWAYS": "10.0.0.1:51820,10.0.0.2:51820",
        "JVPN_AGENT_TRANSPORTS": "TCP",
        "JVPN_AGENT_GATEWAY_PUBLIC_KEY": KEY_B64,
    }
    cfg = load_agent_config(None, env, {"private_key": KEY_HEX})
    assert cfg.tcp_gateways == ["10.0.0.1:51820", "10.0.0.2:51820"]
    assert cfg.transports == ["tcp"]
    assert agent_private_key(cfg) == KEY


def test_agent_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"\[agent\] transports \(from env JVPN_AGENT_TRANSPORTS\)"
    ):
        load_agent_config(None, {"JVPN_AGENT_TRANSPORTS": "udp,sctp"}, {})
    with pytest.raises(ConfigError, match="items must be unique"):
        load_agent_config(None, {"JVPN_AGENT_TRANSPORTS": "udp,UDP"}, {})
    with pytest.raises(
        ConfigError, match=r"\[agent\] gateways \(from flag --gateways\): expected at least 1"
    ):
        load_agent_config(None, {}, {"gateways": []})
    with pytest.raises(
        ConfigError,
        match=r"\[agent\] backoff_initial_s \(from env JVPN_AGENT_BACKOFF_INITIAL_S\): must not",
    ):
        load_agent_config(None, {"JVPN_AGENT_BACKOFF_INITIAL_S": "9"}, {})
    with pytest.raises(ConfigError, match=r"\[agent\] degraded_loss_pct \(default\): must be >="):
        load_agent_config(None, {}, {"volatile_loss_pct": 50})
    with pytest.raises(
        ConfigError, match=r"\[agent\] volatile_loss_pct \(from flag --volatile-loss-pct\)"
    ):
        load_agent_config(None, {}, {"volatile_loss_pct": 101})


def test_configs_are_frozen_dataclasses() -> None:
    for cls in (GatewayConfig, AgentConfig):
        cfg = cls()
        with pytest.raises(AttributeError):
            cfg.log_level = "DEBUG"  # type: ignore[misc]


def test_loader_reads_os_environ_by_default(monkeypatch) -> None:
    monkeypatch.setenv("JVPN_AGENT_KEEPALIVE_INTERVAL_S", "0.25")
    assert load_agent_config().keepalive_interval_s == 0.25
    assert os.environ["JVPN_AGENT_KEEPALIVE_INTERVAL_S"] == "0.25"


def test_tune_gc_sets_the_configured_threshold_or_leaves_the_default() -> None:
    import gc

    from gateway.app import tune_gc
    from gateway.config import load_gateway_config

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc(load_gateway_config(None, env={}, overrides={"gc_gen0_threshold": 0}))
        assert gc.get_threshold() == (700, 10, 10)
        tune_gc(load_gateway_config(None, env={}, overrides={"gc_gen0_threshold": 12345}))
        assert gc.get_threshold()[0] == 12345  # (the older generations differ by version)
    finally:
        gc.set_threshold(*saved)


def test_previous_keks_load_like_the_kek_and_are_redacted(tmp_path, capsys) -> None:
    """KEK rotation: kek_previous (inline) and kek_previous_files (files, with kek_file's
    permission check) give the previous KEKs; --check-config never shows them; they need
    a current KEK."""
    from gateway import cli
    from gateway.config import load_previous_keks

    other = bytes(range(1, 33))
    f = private_file(tmp_path / "old.kek", other.hex() + "\n")
    cfg = load_gateway_config(None, {}, {"kek": KEY_HEX, "kek_previous": [KEY_B64],
                                         "kek_previous_files": [str(f)]})
    assert load_previous_keks(cfg) == [KEY, other]
    assert cli.main(["--check-config", "--set", f"kek={KEY_HEX}",
                     "--set", f"kek_previous={other.hex()}",
                     "--set", f"kek_previous_files={f}"]) == 0
    out = capsys.readouterr().out
    assert other.hex() not in out and KEY_HEX not in out
    shown = json.loads(out)
    assert shown["kek_previous"] == "<redacted>" and shown["kek_previous_files"] == [str(f)]
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_previous_keks(cfg)
    with pytest.raises(ConfigError, match="kek_previous"):
        load_gateway_config(None, {}, {"kek_previous": [KEY_HEX]})  # no current KEK
    with pytest.raises(ConfigError, match="kek_previous"):
        load_gateway_config(None, {}, {"kek": KEY_HEX, "kek_previous": ["not a key"]})


def test_the_ipv6_return_address_is_checked_and_needs_the_ipv4_one() -> None:
    base = {"routed_vip": "10.99.0.254", "routed_vip_interface": "in0"}
    cfg = load_gateway_config(None, {}, {**base, "routed_vip6": "fd99::254"})
    assert cfg.routed_vip6 == "fd99::254"
    with pytest.raises(ConfigError) as info:
        load_gateway_config(None, {}, {**base, "routed_vip6": "10.99.0.253"})
    assert "routed_vip6" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(None, {}, {"routed_vip6": "fd99::254"})
    assert "routed_vip6" in str(info.value) and "routed_vip" in str(info.value)


def test_the_agents_silence_probe_is_a_setting() -> None:
    from agent.config import load_agent_config

    assert load_agent_config(None, {}, {}).probe_silence_s == 0.25
    assert load_agent_config(None, {}, {"probe_silence_s": 0}).probe_silence_s == 0
    with pytest.raises(ConfigError):
        load_agent_config(None, {}, {"probe_silence_s": -1})
