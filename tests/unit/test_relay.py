"""The L3 relay's rules as pure code (session/relay.py): what a relayed datagram must be,
which drop each refusal counts as, what a node believes about a session's owner, and
whom it relays to. Time is passed in."""

from __future__ import annotations

from session.reasons import DropReason
from session.relay import (
    OWNER_CACHE_S,
    RELAY_MAX_AGE_MS,
    OwnerCache,
    RelayCodec,
    RelayRefusal,
    relay_address,
    relay_holder,
)

KEY = bytes(range(32))
SID = bytes(16)


def test_each_relay_refusal_is_counted_as_its_drop_reason() -> None:
    now = 5_000_000
    sender, receiver = RelayCodec(KEY, b"node-a-1", now), RelayCodec(KEY, b"node-b-1", now)
    first = sender.seal(b"\x45" + bytes(27), now)
    assert receiver.open(first, now) == (b"\x45" + bytes(27), None)
    cases = [
        (receiver.open(first, now), RelayRefusal.REPLAYED, DropReason.REPLAYED),
        (receiver.open(first[:-1] + bytes([first[-1] ^ 1]), now), RelayRefusal.BAD_TAG,
         DropReason.BAD_MAC),
        (receiver.open(sender.seal(b"x" * 8, now), now + RELAY_MAX_AGE_MS + 1),
         RelayRefusal.TOO_OLD, DropReason.REPLAYED),
        (receiver.open(b"short", now), RelayRefusal.BAD_TAG, DropReason.BAD_MAC),
    ]
    for (packet, why), refusal, reason in cases:
        assert packet is None and why is refusal and why.drop_reason is reason
    assert RelayRefusal.BUSY.drop_reason is DropReason.QUEUE_FULL
    other_key = RelayCodec(bytes(32), b"node-c-1", now)
    assert receiver.open(other_key.seal(b"y" * 8, now), now)[1] is RelayRefusal.BAD_TAG


def test_a_relayed_packet_sent_before_the_receiver_started_is_refused() -> None:
    sender = RelayCodec(KEY, b"node-a-1", 1000)
    early = sender.seal(b"p" * 20, 1000)
    restarted = RelayCodec(KEY, b"node-b-2", 1001)
    assert restarted.open(early, 1001) == (None, RelayRefusal.TOO_OLD)
    assert restarted.open(sender.seal(b"p" * 20, 1002), 1002) == (b"p" * 20, None)


def test_the_owner_cache_trusts_an_answer_briefly_and_a_move_notice_at_once() -> None:
    cache = OwnerCache()
    assert cache.lookup(7, 0.0) == (False, None)
    cache.learned(7, SID, ("10.0.0.2", 51830), asked_at=0.0, now=0.01)
    assert cache.lookup(7, 0.01 + OWNER_CACHE_S / 2) == (True, ("10.0.0.2", 51830))
    assert cache.lookup(7, 0.01 + OWNER_CACHE_S) == (False, None)  # expired: ask again
    cache.learned(7, SID, ("10.0.0.2", 51830), asked_at=1.0, now=1.0)
    cache.moved(SID, 1.1)  # another node took the binding: forgotten at once
    assert cache.lookup(7, 1.1) == (False, None)
    # "nowhere" (no holder, or ours by the store) is an answer too, kept as briefly
    cache.learned(8, None, None, asked_at=2.0, now=2.0)
    assert cache.lookup(8, 2.1) == (True, None)


def test_an_owner_answer_overtaken_by_a_move_notice_is_not_kept() -> None:
    cache = OwnerCache()
    cache.moved(SID, 1.05)  # heard while the store was being asked (asked at 1.0)
    cache.learned(7, SID, ("10.0.0.2", 51830), asked_at=1.0, now=1.1)
    assert cache.lookup(7, 1.1) == (False, None)  # it served the waiting packets only
    cache.learned(7, SID, ("10.0.0.3", 51830), asked_at=1.2, now=1.3)  # asked after it
    assert cache.lookup(7, 1.3) == (True, ("10.0.0.3", 51830))


def test_a_node_relays_only_to_another_live_holder_at_an_address_it_announced() -> None:
    me = "gw-1#0a0b0c0d"
    assert relay_holder("gw-2#01020304", False, me) == "gw-2#01020304"
    assert relay_holder(me, False, me) is None  # ours by the store, not bound here yet
    assert relay_holder("gw-2#01020304", True, me) is None  # the session ended
    assert relay_holder("", False, me) is None
    assert relay_address("10.0.0.2:51830") == ("10.0.0.2", 51830)
    assert relay_address("[fd00::2]:51830") == ("fd00::2", 51830)
    for bad in (None, "", "10.0.0.2", "10.0.0.2:x", ":51830", "10.0.0.2:70000"):
        assert relay_address(bad) is None, bad
