"""Configuration of the gateway, the agent and the tools: defaults < TOML < env < flags.

``settings.loader`` builds a typed, frozen config from layers the caller
passes in and validates every value (pure: no files, no environment);
``settings.files`` reads the TOML and key files at the edge. The protocol core
(``session``) never imports this package: its machines take plain values.
"""

from settings.files import load_component, read_key_setting, read_toml_file
from settings.loader import (
    ADDRESS,
    IDENT,
    KEY32,
    KNOWN_SECTIONS,
    PEER,
    REDIS_URL,
    URL,
    ConfigError,
    config_as_dict,
    decode_key,
    env_var_name,
    load_config,
    parse_address,
    parse_set_flags,
    parse_toml,
    redact_url,
    select_section,
    setting,
)

__all__ = [
    "ADDRESS",
    "IDENT",
    "KEY32",
    "KNOWN_SECTIONS",
    "PEER",
    "REDIS_URL",
    "URL",
    "ConfigError",
    "config_as_dict",
    "decode_key",
    "env_var_name",
    "load_component",
    "load_config",
    "parse_address",
    "parse_set_flags",
    "parse_toml",
    "read_key_setting",
    "read_toml_file",
    "redact_url",
    "select_section",
    "setting",
]
