"""The node-to-node relay of the L3 mode: what a relayed packet must be, and whom to relay to.

Theory of operation. In routed egress a packet that reaches a node for a session
bound on another node is relayed to that node over UDP (``gateway.l3`` moves the
bytes). This module holds the rules, with the time passed in:

- ``RelayCodec``: the relay datagram, MAC'd under a KEK-derived key and
  replay-protected. ``tag(16) | sender id(8) | counter u64 | sent at, wall ms u64 |
  packet``; the tag is a MAC over everything after it. Each node process picks a
  random sender id at start and counts up. The receiver keeps one replay window
  (``session.replay``, 4096 counters, RFC 6479) per sender and refuses a packet sent
  more than ``RELAY_MAX_AGE_MS`` before (or after) its own clock, or before it
  started. The age bound is what lets the windows be bounded: a sender's window is
  forgotten only once it has been idle longer than the bound, so whatever it accepted
  is too old by then to be accepted again; a receiver that restarted refuses
  everything sent before its start. The nodes' clocks are kept close (the reattach
  proof's timestamp needs it too). Each refusal names its ``DropReason``.
- ``OwnerCache``: what a node believes about which node holds the session of a pool
  index, trusted for ``OWNER_CACHE_S``; a move notice about the session (every node
  hears them) forgets it at once, and an answer the notice overtook is used once, for
  the packets that waited for it, and not kept.
- ``relay_holder``, ``relay_address``: whether a session's record names a node to
  relay to, and where that node said it listens.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from enum import StrEnum

from session.reasons import DropReason
from session.replay import ReplayWindow

RELAY_TAG_LEN = 16
RELAY_HEAD = struct.Struct("!8sQQ")  # sender id, counter, sender's wall clock (ms)
RELAY_OVERHEAD = RELAY_TAG_LEN + RELAY_HEAD.size
RELAY_MAX_AGE_MS = 2000  # a relayed packet older than this (or from the future) is refused
RELAY_SENDERS_MAX = 256  # replay windows kept (one per sending node process)
OWNER_CACHE_S = 0.5  # how long a node trusts what the store said about an owner
OWNER_CACHE_MAX = 65536

Address = tuple[str, int]


class RelayRefusal(StrEnum):
    """Why a relayed datagram was refused (its counter in the L3 plane: ``relay_<value>``)."""

    BAD_TAG = "bad_tag"
    REPLAYED = "replayed"
    TOO_OLD = "too_old"  # too old to tell whether it was seen: refused as a replay
    BUSY = "busy"  # no room for another sender's window

    @property
    def drop_reason(self) -> DropReason:
        return _DROP_REASONS[self]


_DROP_REASONS = {RelayRefusal.BAD_TAG: DropReason.BAD_MAC, RelayRefusal.REPLAYED: DropReason.REPLAYED,
                 RelayRefusal.TOO_OLD: DropReason.REPLAYED, RelayRefusal.BUSY: DropReason.QUEUE_FULL}


def relay_tag(key: bytes, packet: bytes) -> bytes:
    return hmac.new(key, packet, hashlib.blake2s).digest()[:RELAY_TAG_LEN]


class RelayCodec:
    """The node-to-node relay datagram, MAC'd and replay-protected (see the module)."""

    def __init__(self, key: bytes, sender: bytes, started_ms: int) -> None:
        self.key = key
        self.sender = sender
        self.started_ms = started_ms
        self._counter = 0
        self._windows: OrderedDict[bytes, tuple[ReplayWindow, int]] = OrderedDict()

    def seal(self, packet: bytes, now_ms: int) -> bytes:
        self._counter += 1
        body = RELAY_HEAD.pack(self.sender, self._counter, now_ms) + packet
        return relay_tag(self.key, body) + body

    def open(self, data: bytes, now_ms: int) -> tuple[bytes | None, RelayRefusal | None]:
        """(the packet, None) or (None, why it was refused)."""
        if len(data) <= RELAY_OVERHEAD:
            return None, RelayRefusal.BAD_TAG
        tag, body = data[:RELAY_TAG_LEN], data[RELAY_TAG_LEN:]
        if not hmac.compare_digest(tag, relay_tag(self.key, body)):
            return None, RelayRefusal.BAD_TAG
        sender, counter, sent_ms = RELAY_HEAD.unpack_from(body)
        if abs(now_ms - sent_ms) > RELAY_MAX_AGE_MS or sent_ms < self.started_ms:
            return None, RelayRefusal.TOO_OLD
        entry = self._windows.get(sender)
        if entry is None:
            while self._windows:  # forget windows idle past the age bound (oldest first)
                _, (_, seen) = next(iter(self._windows.items()))
                if now_ms - seen <= RELAY_MAX_AGE_MS:
                    break
                self._windows.popitem(last=False)
            if len(self._windows) >= RELAY_SENDERS_MAX:
                return None, RelayRefusal.BUSY
            entry = (ReplayWindow(), now_ms)
        window = entry[0]
        if not window.update(counter):
            return None, RelayRefusal.REPLAYED
        self._windows[sender] = (window, now_ms)
        self._windows.move_to_end(sender)
        return body[RELAY_HEAD.size:], None


class OwnerCache:
    """Where the session of each pool index is bound, as the store said, for a short while."""

    def __init__(self, ttl_s: float = OWNER_CACHE_S, max_entries: int = OWNER_CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._owners: OrderedDict[int, tuple[float, Address | None]] = OrderedDict()
        self._index_of: OrderedDict[bytes, int] = OrderedDict()  # session -> its cached index
        self._moved: OrderedDict[bytes, float] = OrderedDict()  # move notices, recent ones

    def lookup(self, index: int, now: float) -> tuple[bool, Address | None]:
        """(known, where to relay: None is nowhere); not known: ask the store."""
        hit = self._owners.get(index)
        if hit is not None and now - hit[0] < self.ttl_s:
            return True, hit[1]
        return False, None

    def learned(self, index: int, sid: bytes | None, addr: Address | None, asked_at: float,
                now: float) -> None:
        """The store's answer for ``index`` (asked at ``asked_at``): kept, unless a move
        notice about its session came since it was asked (then it serves the packets that
        waited for it only)."""
        stale = sid is not None and self._moved.get(sid, float("-inf")) >= asked_at
        self._owners[index] = (float("-inf") if stale else now, addr)
        self._owners.move_to_end(index)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)
        if sid is not None:
            self._index_of[sid] = index
            self._index_of.move_to_end(sid)
            while len(self._index_of) > self.max_entries:
                self._index_of.popitem(last=False)

    def moved(self, sid: bytes, now: float) -> None:
        """Another node took ``sid``'s binding: what was cached about its owner is stale;
        look it up again at the next packet rather than relay to the old owner (perhaps
        dead) until the cache expires."""
        self._moved[sid] = now
        self._moved.move_to_end(sid)
        while self._moved and (len(self._moved) > self.max_entries
                               or now - next(iter(self._moved.values())) > self.ttl_s * 4):
            self._moved.popitem(last=False)
        index = self._index_of.pop(sid, None)
        if index is not None:
            self._owners.pop(index, None)


def relay_holder(holder: str, terminated: bool, me: str) -> str | None:
    """The node to relay to for a session whose record names ``holder`` (the node instance
    bound to it): None when the session ended, names no node, or names this node (ours by
    the store, not bound here yet: nothing to relay to)."""
    if terminated or not holder or holder == me:
        return None
    return holder


def relay_address(announced: str | None) -> Address | None:
    """A node's announced relay address ("host:port", "[v6]:port") as a socket address;
    None when there is none or it is not one."""
    if not announced:
        return None
    host, _, port = announced.rpartition(":")
    if not host or not port.isdigit() or int(port) > 0xFFFF:
        return None
    return (host.strip("[]"), int(port))
