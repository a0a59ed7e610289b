"""The file edge of config loading: TOML files and key files, read here and only here.

``settings.loader`` is pure; the functions below open the files the operator
names and hand their contents to it. Errors are ``ConfigError``s that name the
file (and the key it was given for).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any, TypeVar

from settings.loader import ConfigError, decode_key, load_config, parse_toml, select_section

T = TypeVar("T")


def read_toml_file(path: str) -> dict[str, Any]:
    """Read and parse a TOML file; errors name the file (and line for syntax errors)."""
    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}", source=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config error: {path}: not UTF-8 ({exc.reason})", source=path) from None
    return parse_toml(text, path)


def read_key_setting(inline: str, path: str, section: str, key: str) -> bytes | None:
    """A 32-byte key given inline or in file ``path`` (hex or base64); None if neither.

    Like ssh with a private key, a file that group or others may read or write (any bit
    of mode 077) is refused before it is read: the key may already have leaked.
    """
    if inline:
        return decode_key(inline)  # validated at load time
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as fp:
            mode = stat.S_IMODE(os.fstat(fp.fileno()).st_mode)  # the file opened, not the name
            if mode & 0o077:
                raise ConfigError(
                    f"config error: [{section}] {key}: {path} is accessible by group or others "
                    f"(mode {mode:04o}); a key file must be private: chmod 600 {path}",
                    key=key, source=path, problem="key file permissions",
                )  # fmt: skip
            text = fp.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ConfigError(f"config error: [{section}] {key}: cannot read {path}: {why}",
                          key=key) from None
    try:
        return decode_key(text)
    except ValueError as exc:
        raise ConfigError(f"config error: [{section}] {key}: {path}: {exc}", key=key) from None


def load_component(cls: type[T], section: str, env_prefix: str, config_env: str,
                   path: str | None, env: Mapping[str, str],
                   overrides: Mapping[str, object] | None) -> T:
    """Load one component's table: the file is ``path``, else ``$<config_env>``, else none."""
    path = path or env.get(config_env) or None
    doc = read_toml_file(path) if path else None
    return load_config(cls, select_section(doc, section, path or ""), env, env_prefix,
                       overrides or {}, section=section, source=path or "config file",
                       reserved_env=(config_env,))
