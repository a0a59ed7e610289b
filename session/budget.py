"""Bounded bookkeeping for what unauthenticated packets may cost: budgets, recent sets.

Theory of operation. Anything a packet can cause before it is authenticated
must cost O(1) time and bounded memory. ``Buckets`` are token buckets keyed by
a source (an IP address): a source spends one token per store-costing request
and earns ``rate`` per second up to ``burst``. ``Recent`` remembers keys for a
while (unknown session ids, used RETRY tokens). ``Throttle`` turns a burst of
identical security events into one event per key and interval, with the count
of those it folded in. Every table has a size bound: past it, the oldest
entries go first (insertion order), so an attacker who fills a table only
evicts its own old entries, never makes one grow. Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class Buckets:
    """Token buckets per key: ``take(key, now)`` is False once a key's budget is spent."""

    __slots__ = ("rate", "burst", "size", "_b")

    def __init__(self, rate: float, burst: float, size: int = 65_536) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._b: OrderedDict[Hashable, list[float]] = OrderedDict()

    def take(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens of ``key``'s budget if it has them."""
        if self.rate < 0:
            return True  # unlimited
        entry = self._b.get(key)
        if entry is None:
            if len(self._b) >= self.size:
                self._b.popitem(last=False)
            entry = self._b[key] = [self.burst, now]
        else:
            tokens, at = entry
            entry[0] = min(self.burst, tokens + (now - at) * self.rate)
            entry[1] = now
        if entry[0] < cost:
            return False
        entry[0] -= cost
        return True


class Recent:
    """Keys remembered for ``ttl`` seconds (at most ``size`` of them)."""

    __slots__ = ("ttl", "size", "_at")

    def __init__(self, ttl: float, size: int = 100_000) -> None:
        self.ttl = ttl
        self.size = size
        self._at: OrderedDict[Hashable, float] = OrderedDict()

    def add(self, key: Hashable, now: float) -> None:
        self._at.pop(key, None)
        if len(self._at) >= self.size:
            self._at.popitem(last=False)
        self._at[key] = now

    def discard(self, key: Hashable) -> None:
        self._at.pop(key, None)

    def seen(self, key: Hashable, now: float) -> bool:
        """Whether ``key`` was added less than ``ttl`` seconds ago."""
        at = self._at.get(key)
        if at is None:
            return False
        if now - at >= self.ttl:
            del self._at[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._at)


class Throttle:
    """At most one event per key and ``interval``; the rest are counted into the next one."""

    __slots__ = ("interval", "size", "_k")

    def __init__(self, interval: float, size: int = 10_000) -> None:
        self.interval = interval
        self.size = size
        self._k: OrderedDict[Hashable, list[float]] = OrderedDict()

    def admit(self, key: Hashable, now: float) -> int | None:
        """None: fold this one in (do not emit). Else emit, with this many folded in since."""
        entry = self._k.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        folded = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._k) >= self.size:
            self._k.popitem(last=False)
        self._k[key] = [now, 0]
        return folded
