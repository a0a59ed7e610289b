"""Sliding-window replay filter for data packet counters (RFC 6479).

Theory of operation. The filter remembers ``highest``, the largest counter
accepted so far, and one bit per counter in the window of ``REPLAY_WINDOW``
counters ending at it: ``highest - REPLAY_WINDOW < c <= highest``. Anything
above ``highest`` is new and slides the window forward; anything at or below
the window's low edge is too old and refused, even if it was never seen, since
we can no longer tell. The bits live in a ring of 64-bit words, as in RFC 6479
and wireguard-go's ``replay`` package: sliding forward only zeroes the words
that the window enters (at most the whole ring), so every call is O(1), with
no shifting of a big bitmap. The ring has one spare word so that the word
holding the low edge is never the one being recycled for the high edge.

``check`` answers "would this be accepted?" without changing anything, so the
caller can drop replays before paying for decryption; ``update`` marks the
counter and must be called only after the packet authenticated (WireGuard
order), otherwise forged packets could move the window.
"""

from __future__ import annotations

REPLAY_WINDOW = 4096  # counters; the design asks for at least 2048
MAX_COUNTER = 2**64 - 1

_WORD_BITS = 64
_WORD_SHIFT = 6
_BIT_MASK = _WORD_BITS - 1
_RING_WORDS = REPLAY_WINDOW // _WORD_BITS + 1

assert REPLAY_WINDOW >= 2048 and REPLAY_WINDOW % _WORD_BITS == 0


class ReplayWindow:
    """Accepts each counter at most once, and none older than the window."""

    __slots__ = ("_ring", "_highest", "_empty")

    def __init__(self) -> None:
        self._ring = [0] * _RING_WORDS
        self._highest = 0
        self._empty = True

    @property
    def highest(self) -> int | None:
        """The largest counter accepted so far (None before the first)."""
        return None if self._empty else self._highest

    def check(self, counter: int) -> bool:
        """Would ``update(counter)`` accept it? Changes nothing."""
        if counter > self._highest:
            return counter <= MAX_COUNTER
        if counter < 0 or self._highest - counter >= REPLAY_WINDOW:
            return False
        word = self._ring[(counter >> _WORD_SHIFT) % _RING_WORDS]
        return not (word >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Mark ``counter`` as seen; False if it is a duplicate, too old or out of range."""
        if not 0 <= counter <= MAX_COUNTER:
            return False
        ring = self._ring
        block = counter >> _WORD_SHIFT
        if counter > self._highest:
            current = self._highest >> _WORD_SHIFT
            # zero only the words the window slides onto (the whole ring at most)
            for i in range(current + 1, current + min(block - current, _RING_WORDS) + 1):
                ring[i % _RING_WORDS] = 0
            self._highest = counter
        elif self._highest - counter >= REPLAY_WINDOW:
            return False
        index = block % _RING_WORDS
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        self._empty = False
        return True
