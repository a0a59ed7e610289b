"""Typed configuration: defaults < TOML < environment < flags, strictly validated.

Theory of operation. A configuration is a frozen dataclass whose field types
drive parsing: ``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``X | None``
and nested dataclasses (TOML sub-tables). Per-field rules (ranges, address
syntax, choices, secrecy) live in the field metadata, declared with
``setting()``. Every layer is validated, even one a later layer overrides, so
a typo in a file never hides behind an environment variable. Every error is a
``ConfigError`` naming the key path and where the value came from:

    config error: [gateway] keepalive_interval_s (from gateway.toml): expected a number, got "fast"

Layer syntax:

- TOML: the table for this config (the caller picks ``[gateway]`` etc. with
  ``select_section``); sub-tables are nested sections.
- Environment: ``<prefix><FIELD>``, nested sections joined by ``__``
  (``JVPN_GATEWAY_STORE_URL``, ``JVPN_GATEWAY_EVENTS__FILE``). Lists are
  comma-separated; booleans accept 1/0, true/false, yes/no, on/off; an empty
  value sets an ``X | None`` field to None. Any variable carrying the prefix
  that names no field is an error (except the ``reserved_env`` ones).
- Overrides (command-line flags): keys ``store_url`` or ``events.file``
  (``-`` and ``__`` are accepted as well); values are typed objects or strings
  parsed as in the environment; a None value means "flag not given". Errors
  name them as ``flag --store-url`` / ``flag --events-file``.

This module is pure: it reads no file, no environment and no clock; callers
pass the parsed TOML, the environment mapping and the overrides in
(``settings.files`` reads the files).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

# Values of ``setting(kind=...)``.
ADDRESS = "address"  # host:port to bind; port 0 means "any free port"
PEER = "peer"  # host:port to reach; port 1-65535
URL = "url"  # http:// or https:// URL
REDIS_URL = "redis_url"  # redis://, rediss://, unix:// or redis+cluster://h:p[,h:p] URL
KEY32 = "key32"  # 32-byte key as 64 hex digits or base64
IDENT = "ident"  # a node id: letters, digits, . _ : -, at most 64

# Top-level tables a shared TOML file may hold; each component reads its own.
KNOWN_SECTIONS = frozenset({"gateway", "agent", "store", "cluster", "demo", "bench"})

_BOOL_WORDS = {
    "1": True, "true": True, "yes": True, "on": True,
    "0": False, "false": False, "no": False, "off": False,
}  # fmt: skip
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class ConfigError(Exception):
    """A configuration value is unknown, malformed or out of range (the one error of ``settings``)."""

    def __init__(self, message: str, *, key: str = "", source: str = "", problem: str = "") -> None:
        self.key = key  # dotted path inside the section, e.g. "events.file"
        self.source = source  # "gateway.toml", "env JVPN_GATEWAY_X", "flag --x", "default"
        self.problem = problem
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class _Source:
    kind: str  # file | env | flag | default
    name: str

    def __str__(self) -> str:
        if self.kind == "default":
            return "default"
        if self.kind == "file":
            return f"from {self.name}"
        return f"from {self.kind} {self.name}"


_DEFAULT = _Source("default", "")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    kind: str | None = None,
    choices: Collection[str] | None = None,
    fold_case: bool = False,
    allow_empty: bool = False,
    min_items: int | None = None,
    unique: bool = False,
    secret: bool = False,
    help: str = "",
) -> Any:
    """Declare a config field with its validation rules (a ``dataclasses.field``)."""
    meta = {
        "min": min, "max": max, "kind": kind,
        "choices": tuple(choices) if choices is not None else None,
        "fold_case": fold_case, "allow_empty": allow_empty, "min_items": min_items,
        "unique": unique, "secret": secret, "help": help,
    }  # fmt: skip
    if isinstance(default, list):
        frozen_default = tuple(default)
        return dataclasses.field(default_factory=lambda: list(frozen_default), metadata=meta)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------
# public entry points


def load_config(
    cls: type[T],
    toml_data: Mapping[str, Any] | None,
    env: Mapping[str, str],
    env_prefix: str,
    overrides: Mapping[str, object],
    *,
    section: str = "",
    source: str = "config file",
    reserved_env: Collection[str] = (),
) -> T:
    """Build ``cls`` from defaults < TOML < env < overrides; raise ConfigError naming key and source."""
    loader = _Loader(section)
    layers: dict[tuple[str, ...], list[tuple[object, _Source]]] = {}
    if toml_data is not None:
        loader.walk_toml(cls, toml_data, (), _Source("file", source), layers)
    for name in sorted(env):
        if not name.startswith(env_prefix) or name in reserved_env:
            continue
        src = _Source("env", name)
        parts = tuple(p.lower() for p in name[len(env_prefix) :].split("__"))
        loader.resolve(cls, parts, src, allow_section=False)
        layers.setdefault(parts, []).append((env[name], src))
    for key, value in overrides.items():
        if value is None:
            continue  # argparse: flag not given
        parts = _override_path(key)
        src = _Source("flag", "--" + "-".join(parts).replace("_", "-"))
        if isinstance(value, Mapping):
            loader.resolve(cls, parts, src, allow_section=True)
            loader.walk_toml(_section_type(cls, parts), value, parts, src, layers)
            continue
        loader.resolve(cls, parts, src, allow_section=False)
        layers.setdefault(parts, []).append((value, src))
    return loader.build(cls, (), layers)


def select_section(
    doc: Mapping[str, Any] | None, name: str, source: str
) -> Mapping[str, Any] | None:
    """Return table ``[name]`` of a TOML document; reject stray top-level keys."""
    if doc is None:
        return None
    for key, value in doc.items():
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config error: {key} (from {source}): top-level key outside any table; "
                f"put it under [{name}]",
                key=key, source=source, problem="top-level key",
            )  # fmt: skip
        if key not in KNOWN_SECTIONS:
            hint = _did_you_mean(key, KNOWN_SECTIONS)
            raise ConfigError(
                f"config error: [{key}] (from {source}): unknown section{hint}",
                key=key, source=source, problem="unknown section",
            )  # fmt: skip
    section = doc.get(name)
    return section if section is not None else {}


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a ConfigError naming the file and line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        line = getattr(exc, "lineno", None)
        if line is None:
            m = re.search(r"\(at line (\d+), column \d+\)", msg)
            line = int(m.group(1)) if m else None
        where = f"{source}:{line}" if line else source
        raise ConfigError(
            f"config error: {where}: invalid TOML: {msg}", source=source, problem=msg
        ) from None


def decode_key(text: str) -> bytes:
    """Decode a 32-byte key written as 64 hex digits or base64; ValueError otherwise."""
    text = text.strip()
    if _HEX64.match(text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("expected a 32-byte key as 64 hex digits or base64") from None
    if len(raw) != 32:
        raise ValueError(
            f"expected a 32-byte key as 64 hex digits or base64 (got {len(raw)} bytes)"
        )
    return raw


def parse_address(text: str, *, peer: bool = False) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); ValueError naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError('expected "host:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
    elif ":" in host:
        raise ValueError('IPv6 addresses need brackets, e.g. "[::1]:51820"')
    elif not _HOSTNAME.match(host):
        raise ValueError(f"bad host {host!r}")
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"bad port {port_text!r}")
    port = int(port_text)
    low = 1 if peer else 0
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range {low}-65535")
    return host, port


REDACTED = "<redacted>"
# A key or query parameter named like this holds a secret; one naming a file, a path, a
# directory or a public key does not (private_key_file, kek_file, gateway_public_key).
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)
_NOT_SECRET_NAME = re.compile(r"_(file|path|dir)$|public", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for a key or query parameter whose name says it holds a secret."""
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET_NAME.search(name)


def redact_url(url: str) -> str:
    """``url`` with its credentials redacted, for output and logs: the password of the
    userinfo (all of it when it has no ``:``, as a lone token often is) and the values of
    secret-named query parameters (token=, password=, api_key=, sig=...). Text, not a
    parser, so a Redis Cluster URL with several hosts or an invalid URL works too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hosts}" if colon else f"{REDACTED}@{hosts}"
    path, q, query = tail.partition("?")
    if q:
        query, hash_, fragment = query.partition("#")
        params = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            params.append(f"{name}={REDACTED}" if eq and is_secret_name(name) else item)
        tail = path + "?" + "&".join(params) + hash_ + fragment
    return f"{scheme}://{netloc}{tail}"


def _redact_value(value: object) -> object:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def config_as_dict(cfg: object, *, redact: bool = True) -> dict[str, Any]:
    """The effective config as plain data (for --check-config and logs). With ``redact``,
    every secret is replaced: fields declared ``secret``, fields named like a secret
    (password, token, key, ...), and the credentials inside any URL (``redact_url``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = config_as_dict(value, redact=redact)
        elif redact and value and (f.metadata.get("secret") or is_secret_name(f.name)):
            out[f.name] = REDACTED
        elif redact:
            out[f.name] = _redact_value(value)
        else:
            out[f.name] = list(value) if isinstance(value, list) else value
    return out


def env_var_name(prefix: str, path: str) -> str:
    """The environment variable for dotted key ``path`` ("events.file" -> PREFIX_EVENTS__FILE)."""
    return prefix + "__".join(p.upper() for p in path.split("."))


def parse_set_flags(items: Iterable[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` items as overrides; a malformed item is a ConfigError."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config error: flag --set {item!r}: expected KEY=VALUE", key=item)
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------
# machinery


def _override_path(key: str) -> tuple[str, ...]:
    key = key.lstrip("-").replace("__", ".").replace("-", "_")
    return tuple(p for p in key.split(".") if p)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (tp, False) otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported config type {tp!r}")
    return tp, False


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _section_type(cls: type, parts: tuple[str, ...]) -> type:
    for part in parts:
        cls = _strip_optional(_hints(cls)[part])[0]
    return cls


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(value: object, secret: bool = False) -> str:
    if secret:
        return "a value (redacted)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(redact_url(value))
        return text if len(text) <= 64 else text[:60] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


class _Loader:
    def __init__(self, section: str) -> None:
        self.section = section

    def where(self, path: tuple[str, ...]) -> str:
        table = ".".join(p for p in (self.section, *path[:-1]) if p)
        return f"[{table}] {path[-1]}" if table else path[-1]

    def error(self, path: tuple[str, ...], src: _Source, problem: str) -> ConfigError:
        return ConfigError(
            f"config error: {self.where(path)} ({src}): {problem}",
            key=".".join(path), source=src.name or src.kind, problem=problem,
        )  # fmt: skip

    def resolve(
        self, cls: type, parts: tuple[str, ...], src: _Source, *, allow_section: bool
    ) -> None:
        """Check that ``parts`` names a field (or, if allowed, a section) of ``cls``."""
        if not parts:
            raise self.error(("?",), src, "empty key")
        here = cls
        for i, part in enumerate(parts):
            known = _fields(here)
            if part not in known:
                raise self.error(parts[: i + 1], src, "unknown key" + _did_you_mean(part, known))
            tp = _strip_optional(_hints(here)[part])[0]
            last = i == len(parts) - 1
            if _is_section(tp):
                if last and not allow_section:
                    raise self.error(parts, src, "is a section; set its keys one by one")
                here = tp
            elif not last:
                raise self.error(parts[: i + 1], src, "is not a section")

    def walk_toml(
        self,
        cls: type,
        table: Mapping[str, Any],
        prefix: tuple[str, ...],
        src: _Source,
        layers: dict[tuple[str, ...], list[tuple[object, _Source]]],
    ) -> None:
        known = _fields(cls)
        hints = _hints(cls)
        for key, value in table.items():
            path = (*prefix, key)
            if key not in known:
                raise self.error(path, src, "unknown key" + _did_you_mean(key, known))
            tp = _strip_optional(hints[key])[0]
            if _is_section(tp):
                if not isinstance(value, Mapping):
                    raise self.error(path, src, f"expected a table, got {_describe(value)}")
                self.walk_toml(tp, value, path, src, layers)
            else:
                layers.setdefault(path, []).append((value, src))

    def build(
        self,
        cls: type[T],
        prefix: tuple[str, ...],
        layers: dict[tuple[str, ...], list[tuple[object, _Source]]],
    ) -> T:
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        sources: dict[str, _Source] = {}
        for name, f in _fields(cls).items():
            path = (*prefix, name)
            tp, optional = _strip_optional(hints[name])
            if _is_section(tp):
                kwargs[name] = self.build(tp, path, layers)
                continue
            for raw, src in layers.get(path, ()):
                value = self.convert(tp, optional, raw, src, path, f.metadata)
                self.validate(value, src, path, f.metadata)
                kwargs[name] = _canonical(value, f.metadata)
                sources[name] = src
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:  # a required field without default, etc.
            raise ConfigError(f"config error: [{self.section}] {exc}") from None
        check = getattr(obj, "check_config", None)
        if check is not None:
            for key, problem in check():
                src = sources.get(key.split(".")[0], _DEFAULT)
                raise self.error((*prefix, *key.split(".")), src, problem)
        return obj

    # -- conversion -------------------------------------------------------

    def convert(
        self,
        tp: Any,
        optional: bool,
        raw: object,
        src: _Source,
        path: tuple[str, ...],
        meta: Mapping[str, Any],
    ) -> Any:
        textual = isinstance(raw, str) and src.kind in ("env", "flag")
        secret = bool(meta.get("secret"))
        if raw is None and optional:
            return None
        if optional and textual and raw == "":
            return None  # an empty env var / flag clears an optional field
        try:
            if tp is str:
                if not isinstance(raw, str):
                    raise ValueError("expected a string")
                return raw
            if tp is bool:
                if isinstance(raw, bool):
                    return raw
                if textual:
                    assert isinstance(raw, str)
                    word = raw.strip().lower()
                    if word in _BOOL_WORDS:
                        return _BOOL_WORDS[word]
                raise ValueError("expected true or false")
            if tp is int:
                if isinstance(raw, int) and not isinstance(raw, bool):
                    return raw
                if textual:
                    assert isinstance(raw, str)
                    try:
                        return int(raw.strip(), 10)
                    except ValueError:
                        pass
                raise ValueError("expected an integer")
            if tp is float:
                value: float | None = None
                if isinstance(raw, int | float) and not isinstance(raw, bool):
                    value = float(raw)
                elif textual:
                    assert isinstance(raw, str)
                    try:
                        value = float(raw.strip())
                    except ValueError:
                        value = None
                if value is None:
                    raise ValueError("expected a number")
                if not math.isfinite(value):
                    raise ValueError("expected a finite number")
                return value
            if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
                if textual:
                    assert isinstance(raw, str)
                    return [item.strip() for item in raw.split(",") if item.strip()]
                if not isinstance(raw, list | tuple):
                    raise ValueError("expected a list of strings")
                for i, item in enumerate(raw):
                    if not isinstance(item, str):
                        raise ValueError(
                            f"expected a list of strings, item {i} is {_describe(item)}"
                        )
                return list(raw)
        except ValueError as exc:
            raise self.error(path, src, f"{exc}, got {_describe(raw, secret)}") from None
        raise TypeError(f"unsupported config type {tp!r} for {'.'.join(path)}")

    # -- validation -------------------------------------------------------

    def validate(
        self, value: Any, src: _Source, path: tuple[str, ...], meta: Mapping[str, Any]
    ) -> None:
        if value is None:
            return
        secret = bool(meta.get("secret"))
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = meta.get("min"), meta.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                rng = f"{_num(low) if low is not None else '-inf'}..{_num(high) if high is not None else 'inf'}"
                raise self.error(path, src, f"{_describe(value)} is out of range {rng}")
        elif isinstance(value, str):
            problem = _check_text(value, meta)
            if problem:
                raise self.error(path, src, f"{problem}, got {_describe(value, secret)}")
        elif isinstance(value, list):
            min_items = meta.get("min_items")
            if min_items is not None and len(value) < min_items:
                raise self.error(path, src, f"expected at least {min_items} item(s)")
            seen = {v.lower() for v in value} if meta.get("fold_case") else set(value)
            if meta.get("unique") and len(seen) != len(value):
                raise self.error(path, src, "items must be unique")
            for i, item in enumerate(value):
                problem = _check_text(item, meta)
                if problem:
                    raise self.error(
                        path, src, f"item {i}: {problem}, got {_describe(item, secret)}"
                    )


def _canonical(value: Any, meta: Mapping[str, Any]) -> Any:
    """Case-folded choices take their declared spelling ("debug" -> "DEBUG")."""
    choices = meta.get("choices")
    if not (choices and meta.get("fold_case")):
        return value
    spelling = {c.lower(): c for c in choices}
    if isinstance(value, str):
        return spelling.get(value.lower(), value)
    if isinstance(value, list):
        return [spelling.get(v.lower(), v) for v in value]
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_text(value: str, meta: Mapping[str, Any]) -> str:
    """Return a problem description, or "" if ``value`` satisfies the metadata."""
    if value == "" and meta.get("allow_empty"):
        return ""
    choices = meta.get("choices")
    if choices is not None:
        ok = (
            value.lower() in {c.lower() for c in choices}
            if meta.get("fold_case")
            else value in choices
        )
        if not ok:
            return "expected one of " + ", ".join(choices)
    kind = meta.get("kind")
    if kind is None:
        return ""
    try:
        if kind in (ADDRESS, PEER):
            parse_address(value, peer=kind == PEER)
        elif kind == KEY32:
            decode_key(value)
        elif kind == IDENT:
            if not _IDENT.match(value):
                raise ValueError("expected 1-64 letters, digits or . _ : - (starting alphanumeric)")
        elif kind == URL:
            _check_url(value, ("http", "https"))
        elif kind == REDIS_URL:
            scheme, sep, rest = value.partition("://")
            if sep and scheme in ("redis+cluster", "rediss+cluster"):
                # A Redis Cluster: startup nodes as host:port[,host:port...] (optional /db).
                nodes = rest.split("/", 1)[0].rpartition("@")[2]
                for node in nodes.split(","):
                    parse_address(node, peer=True)
            else:
                _check_url(value, ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"))
        else:
            raise TypeError(f"unknown setting kind {kind!r}")
    except ValueError as exc:
        return str(exc)
    return ""


def _check_url(value: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise ValueError(f"bad URL ({exc})") from None
    if parts.scheme not in schemes:
        raise ValueError("expected a URL with scheme " + " or ".join(f"{s}://" for s in schemes))
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("expected unix:///path/to/socket")
    elif not parts.hostname:
        raise ValueError("URL has no host")
