"""Exceptions of the store: one base class; unavailability is its own type.

``StoreUnavailable`` is what callers map to ``RejectReason.STORE_UNAVAILABLE``
(docs/ARCHITECTURE.md, Reattach step by step): the store could not give an authoritative answer
(connection refused or reset, timeout, BUSY, LOADING, READONLY, NOREPLICAS,
MASTERDOWN, TRYAGAIN, CLUSTERDOWN, OOM, a durable-mode WAIT not acknowledged).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``store``."""


class StoreUnavailable(StoreError):
    """The store gave no authoritative answer; fail closed.

    ``maybe_applied`` is True when a mutation may have reached the store before
    the failure (its outcome is unknown and must be re-read, never guessed).
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        self.maybe_applied = maybe_applied
        super().__init__(message)


class StoreNotDurable(StoreUnavailable):
    """Durable mode: the write reached the primary but too few replicas acknowledged it.

    Never treated as success, not even after a re-read (the primary shows the
    write, a failover may lose it): the caller must not activate anything.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, maybe_applied=True)


class StoreProtocolError(StoreError):
    """The store answered something this code does not understand (a bug or a version skew)."""
