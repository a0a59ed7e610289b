"""Which data plane seals and opens DATA packets: the compiled module or the Python reference.

The per-packet path has two implementations of one wire: ``jvpn_dataplane`` (Rust, built
from ``dataplane/`` by maturin) and ``session.framing`` / ``session.replay`` (pure
Python, ``cryptography``'s AEAD), which stays the reference and the fallback. Both have
the same ``DataChannel`` API and raise the same errors with the same ``DropReason``; the
differential tests prove it. Machines make channels through ``new_channel`` and never
know which one they got. The adapters choose at start (``select``) and say which is
active; until then the Python reference is used.
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from types import ModuleType
from typing import Any

from session import framing
from session.keys import traffic_keys


class DataPlane(StrEnum):
    AUTO = "auto"  # the compiled module when it is installed, else the Python reference
    COMPILED = "compiled"
    PYTHON = "python"


_channel_class: Any = framing.DataChannel
_active = DataPlane.PYTHON


def compiled_module() -> ModuleType | None:
    """The compiled module, or None when it is not installed (no Rust toolchain at build)."""
    try:
        return importlib.import_module("jvpn_dataplane")
    except ImportError:
        return None


def select(choice: DataPlane | str = DataPlane.AUTO) -> DataPlane:
    """Use ``choice`` for every channel made from now on; returns the one now active.

    ``compiled`` when the module is missing raises ``LookupError``: a deployment that asks
    for it must not silently run the slower path.
    """
    global _channel_class, _active
    choice = DataPlane(choice)
    module = compiled_module() if choice is not DataPlane.PYTHON else None
    if module is None:
        if choice is DataPlane.COMPILED:
            raise LookupError("data_plane = compiled, but the compiled data plane "
                              "(jvpn_dataplane) is not installed")
        _channel_class, _active = framing.DataChannel, DataPlane.PYTHON
    else:
        _channel_class, _active = module.DataChannel, DataPlane.COMPILED
    return _active


def active() -> DataPlane:
    """The data plane new channels use."""
    return _active


def describe() -> str:
    """One line for a start-up log: which data plane is active, and why."""
    if _active is DataPlane.COMPILED:
        module = compiled_module()
        version = getattr(module, "__version__", "?")
        return f"data plane: compiled (jvpn_dataplane {version})"
    if compiled_module() is None:
        return "data plane: python (the compiled module jvpn_dataplane is not installed)"
    return "data plane: python (chosen by configuration)"


def new_channel(send_key: bytes, recv_key: bytes, session_id: bytes, epoch: int) -> framing.DataChannel:
    """A DataChannel of the active data plane."""
    ch: framing.DataChannel = _channel_class(send_key, recv_key, session_id, epoch)
    return ch


def channel_from_secret(
    secret: bytes,
    *,
    session_id: bytes,
    epoch: int,
    binding_id: bytes,
    node_id: bytes,
    is_gateway: bool,
) -> framing.DataChannel:
    """The active data plane's channel of one side of a binding (``DataChannel.from_secret``)."""
    c2g, g2c = traffic_keys(secret, epoch, binding_id, node_id)
    send, recv = (g2c, c2g) if is_gateway else (c2g, g2c)
    return new_channel(send, recv, session_id, epoch)
