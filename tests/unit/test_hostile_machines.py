"""The client and gateway machines under attack, in memory (tests/support/memnet.py).

Each test is one attempt by an on-path attacker or a hostile client on a rule of
docs/ARCHITECTURE.md (Security rules, as implemented: "Pending, then active
binding" and "Rekey"): copied and replayed packets, floods, races, low-order
keys, and what a node keeps after a REKEY. The docstring says the attack and
what must hold.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

from session import wire
from session.binding import Peer
from session.client import Reattached, Rekeyed
from session.framing import DataChannel
from session.gateway import MAX_HELD, GatewayMachine
from session.noise import generate_keypair
from session.reasons import DropReason
from session.storeops import ActivateOp, ClientPolicy, RekeyOp
from tests.support.memnet import WALL_MS, Cl, Gw, Net
from tests.unit.test_machines import (
    ATTACKER,
    CL_PRIV,
    CL_PUB,
    GW_PRIV,
    GW_PUB,
    GW_SETTINGS,
    HOME,
    KEK,
    OTHER,
    PARAMS,
    REKEY_PARAMS,
    UPSTREAM,
    pump,
    setup,
)

UDP = wire.TransportKind.UDP


def _drops(gw: Gw, reason: DropReason) -> int:
    return sum(1 for a, _ in gw.metrics.named("count_drop") if a[0] is reason)


def _epoch_of(raw: bytes) -> int | None:
    msg = wire.decode(raw)
    return msg.epoch if isinstance(msg, wire.Data) else None


def _rekey_session(net: Net, params: Any = REKEY_PARAMS,
                   **settings: Any) -> tuple[Cl, Gw]:
    gw = net.gateway("gw-a", GW_PRIV, KEK, **{**GW_SETTINGS, **settings})
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, params)
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, UDP)
    net.run(0.5)
    return c, gw


# ---- PENDING / ACTIVE --------------------------------------------------------------------


def test_a_copied_data_packet_cannot_become_the_pending_bindings_peer() -> None:
    """The client's first packets under a granted epoch are copied and sent from another
    address before the genuine ones arrive (here the genuine ones are lost). The copies are
    the client's (they decrypt), but prove nothing about the copier's address: the pending
    binding challenges it within 3x what it sent and neither moves there nor activates; the
    client's own packets from the granted address then activate it there."""
    net = Net(seed=101)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    path = net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, UDP)
    while sid not in gwb.machine.pending and net.now < 1.0:
        net.run(net.now + 0.001)
    p = gwb.machine.pending[sid]
    path.uplink = False  # the client's first packets under the new epoch are lost...
    while not c.of(Reattached) and net.now < 1.0:
        net.run(net.now + 0.001)
    pump(net, c, net.now + 0.05)
    copies = [raw for addr, raw in net.uplink_log if addr == OTHER and _epoch_of(raw) == p.epoch]
    assert copies
    for raw in copies:  # ...and reach gw-b from the attacker first
        net.inject("gw-b", ATTACKER, raw)
    net.run(net.now + 0.05)
    assert gwb.machine.pending.get(sid) is p and not p.validated and p.peer.addr == OTHER
    assert not any(isinstance(op, ActivateOp) for op in net.store.calls)
    assert net.store.records[sid].node == gwa.machine.instance_id
    to_attacker = sum(len(d) for a, d in net.injected if a == ATTACKER)
    assert to_attacker <= 3 * sum(len(r) for r in copies)
    path.uplink = True
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    b = gwb.machine.bindings[sid]
    assert b is p and b.peer.addr == OTHER and b.validated
    assert net.store.records[sid].node == gwb.machine.instance_id
    assert set(sent) <= set(c.received)


def test_a_flood_of_packets_for_a_pending_binding_holds_at_most_max_held() -> None:
    """While activate.lua runs (a slow store), the client (or a hostile one) sends many
    packets on the pending binding: at most MAX_HELD wait, the rest are dropped and
    counted, and activation delivers exactly those held, once."""
    net = Net(seed=103)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, UDP)
    while sid not in gw.machine.pending and net.now < 1.0:
        net.run(net.now + 0.001)
    p = gw.machine.pending[sid]
    net.store_latency = 0.2  # activate.lua's answer comes late
    while not c.of(Reattached) and net.now < 1.0:
        net.run(net.now + 0.001)
    upstream_before = len(gw.upstream)
    flood = 5 * MAX_HELD
    for i in range(flood):
        assert c.machine.send(b"f%04d" % i, net.now)
    most = 0
    t_end = net.now + 0.15
    while net.now < t_end:
        net.run(net.now + 0.002)
        if gw.machine.pending.get(sid) is p:
            most = max(most, len(p.held or []))
    assert most == MAX_HELD
    assert _drops(gw, DropReason.NOT_VALIDATED) >= flood - MAX_HELD
    net.run(net.now + 0.3)
    assert gw.machine.bindings[sid] is p and p.held is None
    got = [d for d in gw.upstream[upstream_before:] if d.startswith(b"f")]
    assert len(got) == len(set(got)) <= MAX_HELD and got == sorted(got)


def test_two_nodes_holding_a_pending_for_one_session_activate_only_the_newer() -> None:
    """A copier's request is granted on gw-b, the client's own retry on gw-c: both nodes
    hold a PENDING binding. The copier then validates nothing; the client's packets
    activate gw-c's; gw-b's grant is superseded (never ACTIVE) and dropped when it lapses,
    and the store named one ACTIVE binding at every instant."""
    net = Net(seed=107)
    c, (gwa, gwb, gwc) = setup(net, ("gw-a", "gw-b", "gw-c"))
    sid = c.machine.session_id
    rec = net.store.records[sid]
    net.add_path(c, 2, OTHER, "gw-c")
    c.machine.reattach(net.now, 2, UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    net.inject("gw-b", ATTACKER, raw)  # the copy wins the CAS on gw-b
    net.at(0.02, lambda: net.to_gateway(c.paths[2], raw))
    actives: set[tuple[int, str]] = set()
    both = False
    t_end = net.now + 1.0
    while net.now < t_end:
        net.run(net.now + 0.001)
        actives.add((rec.epoch, rec.node))
        both = both or (sid in gwb.machine.pending and sid in gwc.machine.pending)
    assert sid in gwc.machine.bindings and sid not in gwb.machine.bindings
    assert sid not in gwb.machine.pending and sid not in gwa.machine.bindings
    assert {n for _, n in actives} == {gwa.machine.instance_id, gwc.machine.instance_id}
    assert len({e for e, _ in actives}) == len(actives)
    epochs = sorted(op.epoch for op in net.store.calls if isinstance(op, ActivateOp))
    assert epochs and all(e == rec.epoch for e in epochs), epochs


# ---- REKEY -------------------------------------------------------------------------------


def test_a_rekey_with_a_low_order_or_zero_public_key_is_refused_without_a_store_write() -> None:
    """A hostile client sends REKEYs whose public key is all zeros, or a point of small
    order (its X25519 output is all zeros): dropped and counted, no store call, no answer,
    and the binding is free for a genuine REKEY afterwards."""
    net = Net(seed=109)
    c, [gw] = setup(net, keys_reject_after_s=180.0)
    sid = c.machine.session_id
    net.run(net.now + 1.2)  # past the one-REKEY-a-second bound
    b = gw.machine.bindings[sid]
    calls = len(net.store.calls)
    bad = [bytes(32), (1).to_bytes(32, "little"),
           bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
           (2**255 - 19).to_bytes(32, "little")]
    for i, pub in enumerate(bad):
        raw = c.machine._seal(wire.inner_rekey(0, pub))  # noqa: SLF001
        gw.machine.receive(raw, Peer(UDP, HOME), net.now + i * 0.001)
    gw.flush()
    assert not any(isinstance(op, RekeyOp) for op in net.store.calls[calls:])
    assert _drops(gw, DropReason.BAD_HANDSHAKE) == len(bad)
    assert b.rekey is None and b.secrets.generation == 0


def _rekeyed_once(seed: int, **settings: Any) -> tuple[Net, Cl, Gw, bytes, list[bytes]]:
    """A session that completed one REKEY; returns the client's packets sent before it."""
    net = Net(seed=seed)
    c, gw = _rekey_session(net, replace(REKEY_PARAMS, rekey_after=1.0, reject_after=100.0),
                           **{"keys_reject_after_s": 180.0, **settings})
    sid = c.machine.session_id
    old_epoch = c.machine.epoch
    while not c.of(Rekeyed) and net.now < 3.0:
        pump(net, c, net.now + 0.05)
    pump(net, c, net.now + 0.1)
    assert c.of(Rekeyed) and gw.machine.bindings[sid].prev_channel is None
    before = [raw for addr, raw in net.uplink_log if _epoch_of(raw) == old_epoch]
    return net, c, gw, sid, before


def test_a_replayed_rekey_after_completion_changes_nothing() -> None:
    """Every packet the client sent under the keys a REKEY replaced (its REKEY among them)
    is sent again after the REKEY completed: dropped as a stale epoch, no store call, the
    secret and the binding unchanged."""
    net, c, gw, sid, before = _rekeyed_once(113)
    b = gw.machine.bindings[sid]
    secret, epoch, calls = b.secrets.secret, b.epoch, len(net.store.calls)
    stale = _drops(gw, DropReason.STALE_EPOCH)
    for raw in before:
        gw.machine.receive(raw, Peer(UDP, HOME), net.now)
    gw.flush()
    assert not any(isinstance(op, RekeyOp) for op in net.store.calls[calls:])
    assert _drops(gw, DropReason.STALE_EPOCH) - stale == len(before)
    assert (b.secrets.secret, b.epoch, b.rekey) == (secret, epoch, None)


def test_a_replayed_or_reordered_rekey_ack_changes_nothing_at_the_client() -> None:
    """The gateway's REKEY_ACK is delivered again after the client took it (a replay, or a
    duplicate that arrives late): dropped, the client keeps its generation and epoch."""
    net, c, gw, sid, _ = _rekeyed_once(127)
    gen, epoch = c.machine._generation, c.machine.epoch  # noqa: SLF001
    acks = [d for peer, d in gw.sent if peer.addr == HOME]
    dropped = c.machine.stats["dropped_input"]
    for raw in acks[-40:]:
        c.machine.receive(raw, 1, net.now)
    assert (c.machine._generation, c.machine.epoch) == (gen, epoch)  # noqa: SLF001
    assert c.machine.stats["dropped_input"] > dropped
    assert len(c.of(Rekeyed)) == 1


def test_a_rekey_under_the_previous_epoch_after_confirmation_is_dropped() -> None:
    """A hostile client (it holds the previous keys) sends a fresh REKEY under the previous
    epoch once the new keys are confirmed: the node no longer holds that channel (stale
    epoch), so nothing is asked of the store."""
    net, c, gw, sid, _ = _rekeyed_once(131)
    prev_secret_ch = c.machine._prev_channel  # noqa: SLF001
    assert prev_secret_ch is None  # the client dropped it too once the downlink moved
    b = gw.machine.bindings[sid]
    assert b.prev_channel is None and b.rekey is None
    calls = len(net.store.calls)
    old_epoch = b.epoch - 1
    _, pub = generate_keypair()
    ch = DataChannel.from_secret(b"\x00" * 32, session_id=sid, epoch=old_epoch,
                                 binding_id=b"\x00" * 16, node_id=b.node_id, is_gateway=False)
    gw.machine.receive(ch.seal(wire.inner_rekey(0, pub)), Peer(UDP, HOME), net.now)
    gw.flush()
    assert not any(isinstance(op, RekeyOp) for op in net.store.calls[calls:])


def test_a_rekey_copied_from_another_address_does_not_move_or_leak_the_session() -> None:
    """The client's REKEY is copied and reaches the node from the attacker's address first.
    It is the client's own (it decrypts): the REKEY runs, but its answer goes to the
    binding's peer, the attacker's address gets at most 3x what it sent, the downlink stays
    home, and the client completes the REKEY."""
    net = Net(seed=137)
    c, gw = _rekey_session(net, replace(REKEY_PARAMS, rekey_after=1.0, reject_after=100.0,
                                        dead_after=100), keys_reject_after_s=180.0)
    sid = c.machine.session_id
    c.paths[1].uplink = False
    while c.machine._rekey is None and net.now < 2.0:  # noqa: SLF001
        pump(net, c, net.now + 0.01)
    net.run(net.now + 0.01)
    epoch = c.machine.epoch
    copies = [raw for addr, raw in net.uplink_log[-3:] if _epoch_of(raw) == epoch]
    for raw in copies:
        net.inject("gw-a", ATTACKER, raw)
    net.run(net.now + 0.02)
    assert any(isinstance(op, RekeyOp) for op in net.store.calls)
    c.paths[1].uplink = True
    sent = pump(net, c, net.now + 0.5)
    net.run(net.now + 0.1)
    assert [r.generation for r in c.of(Rekeyed)] == [1]
    b = gw.machine.bindings[sid]
    assert b.peer.addr == HOME and b.secrets.generation == 1
    to_attacker = sum(len(d) for a, d in net.injected if a == ATTACKER)
    assert to_attacker <= 3 * sum(len(r) for r in copies)
    assert set(sent) <= set(c.received)


def test_no_rekey_is_sent_while_a_reattach_is_outstanding() -> None:
    """A REKEY falls due while the client's reattach is unanswered (its path is down): the
    client sends none (a REKEY on the binding it is leaving would race the grant); after
    the reattach it rekeys on the new binding."""
    net = Net(seed=139)
    net_params = replace(REKEY_PARAMS, rekey_after=1.0, reject_after=100.0)
    c, gw = _rekey_session(net, net_params, keys_reject_after_s=180.0)
    net.add_path(c, 2, OTHER, "gw-a")
    c.paths[2].up = False
    c.machine.reattach(net.now, 2, UDP)
    net.run(1.2)  # the REKEY was due at 1.0; the request is still outstanding (retransmitted)
    assert c.machine._req is not None  # noqa: SLF001
    assert not any(isinstance(op, RekeyOp) for op in net.store.calls)
    c.paths[2].up = True
    while not c.of(Rekeyed) and net.now < 4.0:
        pump(net, c, net.now + 0.05)
    assert c.of(Reattached) and [r.generation for r in c.of(Rekeyed)] == [1]


def _reachable(root: object, limit: int = 300_000) -> list[object]:
    """Every object reachable from ``root`` (bounded)."""
    seen: set[int] = set()
    out: list[object] = []
    todo = [root]
    while todo and len(out) < limit:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        out.append(o)
        todo.extend(gc.get_referents(o))
        if hasattr(o, "__slots__") and not isinstance(o, type):
            for name in getattr(type(o), "__slots__", ()):
                v = getattr(o, name, None)
                if v is not None:
                    todo.append(v)
    assert len(out) < limit
    return out


def test_after_a_confirmed_rekey_the_node_keeps_neither_the_old_secret_nor_its_channel() -> None:
    """Forward secrecy for the node's memory as for the store's: once the client's first
    packet under the new keys is confirmed, nothing reachable from the gateway machine holds
    the previous session secret, its derived keys or the previous binding's channel."""
    net = Net(seed=149)
    c, gw = _rekey_session(net, replace(REKEY_PARAMS, rekey_after=1.0, reject_after=100.0),
                           keys_reject_after_s=180.0)
    sid = c.machine.session_id
    m: GatewayMachine = gw.machine
    old = m.bindings[sid]
    old_secret, old_keys, old_channel = old.secrets.secret, old.secrets.keys, old.channel
    while not c.of(Rekeyed) and net.now < 3.0:
        pump(net, c, net.now + 0.05)
    pump(net, c, net.now + 0.1)
    b = m.bindings[sid]
    assert b.secrets.generation == 1 and b.prev_channel is None
    objs = _reachable(m)
    assert not any(o is old_channel or o is old_keys for o in objs)
    assert not any(isinstance(o, bytes) and o == old_secret for o in objs)
    assert not any(isinstance(o, bytes) and o in (old_keys.proof_key, old_keys.control_key)
                   for o in objs)


def test_keys_past_reject_after_carry_no_payload_either_way() -> None:
    """A client that never completes a REKEY (its answers are lost) keeps sending payloads
    under its secret: past keys_reject_after_s after that secret was made the node drops
    them (KEYS_EXPIRED), also under the previous keys of a REKEY the node committed, and
    tunnels nothing back under them; keepalives and the REKEY itself still pass."""
    net = Net(seed=151)
    hostile = replace(PARAMS, rekey_after=1.0, reject_after=100.0, rekey_timeout=0.1,
                      dead_after=100)
    c, gw = _rekey_session(net, hostile, keys_reject_after_s=1.6)
    sid = c.machine.session_id
    b = gw.machine.bindings[sid]
    made = b.secrets.made_ms
    c.paths[1].downlink = False  # every answer is lost: the REKEY never completes
    net.run(1.2)
    assert b.secrets.generation == 1 and b.prev_channel is not None, "the node did not rekey"
    while gw.machine.store_ms(net.now) - made < 1600 + 50:
        pump(net, c, net.now + 0.05)
    upstream = len(gw.upstream)
    expired = _drops(gw, DropReason.KEYS_EXPIRED)
    late = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.05)
    assert late and len(gw.upstream) == upstream, "payloads under expired keys went upstream"
    assert _drops(gw, DropReason.KEYS_EXPIRED) - expired >= len(late)
    sent_before = len(gw.sent)
    gw.machine.upstream_received(sid, b"down under expired keys", net.now)
    gw.flush()
    downlink = [d for _, d in gw.sent[sent_before:]]
    assert not downlink, "a payload was sealed under keys past reject-after"
    # keepalives are still answered, and the REKEY (or a rebinding reattach) still completes
    c.paths[1].downlink = True
    t_end = net.now + 3.0
    while not c.of(Rekeyed) and net.now < t_end:
        net.run(net.now + 0.005)
    assert [r.generation for r in c.of(Rekeyed)] == [1]
    # That answer was the one the node committed before the loss (the client asked again
    # with the same key): its secret counts from then, so the client REKEYs again at once.
    while len(c.of(Rekeyed)) < 2 and net.now < t_end + 1.0:
        net.run(net.now + 0.005)
    assert [r.generation for r in c.of(Rekeyed)] == [1, 2]
    sent = pump(net, c, net.now + 0.2)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received)


def test_a_reattach_request_withheld_across_a_rekey_cannot_undo_it() -> None:
    """An on-path attacker swallows the client's REATTACH_REQUEST for a jump (the request
    times out; the client stays on its path) and keeps it. The client REKEYs; the attacker
    holds back its first packets under the new keys (so the store still keeps the previous
    secret) and delivers the old request, proven under the previous secret. The node
    verifies it (under the previous secret the record still has) but the store refuses it:
    made before the REKEY, it cannot say the client missed the answer. The new secret stays
    current, the client's packets confirm it, and the client's later reattach succeeds."""
    net = Net(seed=157)
    params = replace(REKEY_PARAMS, rekey_after=1.5, reject_after=100.0, dead_after=100)
    c, gw = _rekey_session(net, params, keys_reject_after_s=180.0)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    jump = net.add_path(c, 2, OTHER, "gw-a")
    jump.up = False  # the attacker swallows everything on it
    c.machine.reattach(net.now, 2, UDP)
    withheld = c.machine._req.raw  # noqa: SLF001
    t_end = net.now + 2.0
    while c.machine._req is not None and net.now < t_end:  # noqa: SLF001
        net.run(net.now + 0.01)
    assert c.machine._req is None  # timed out; still on path 1  # noqa: SLF001
    while rec.kg == 0 and net.now < 3.0:
        net.run(net.now + 0.001)
    c.paths[1].uplink = False  # the attacker holds back the client's packets from here on
    assert rec.kg == 1 and rec.wsp, "no REKEY committed"
    net.run(net.now + 0.02)
    assert c.of(Rekeyed) and rec.wsp
    net.inject("gw-a", ATTACKER, withheld)
    net.run(net.now + 0.05)
    assert rec.kg == 1 and rec.pnd == "", "the withheld request undid the REKEY"
    c.paths[1].uplink = True
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert [r.generation for r in c.of(Rekeyed)] == [1]
    assert rec.kg == 1 and rec.wsp == b"" and set(sent) <= set(c.received)
    jump.up = True
    c.machine.reattach(net.now, 2, UDP)
    while not c.of(Reattached) and net.now < t_end + 3.0:
        net.run(net.now + 0.01)
    assert c.of(Reattached) and rec.kg == 1


def test_a_rekey_answer_dropped_for_a_failed_jump_does_not_wedge_the_binding() -> None:
    """The client sends a REKEY, the node commits it, and just then the agent starts a
    proactive jump (the client forgets its REKEY: a reattach proven under the previous
    secret undoes it). The jump's path is dead: the request times out and the client stays
    on its path, holding the previous secret. It must be able to REKEY again and keep
    tunnelling past reject-after: after REKEY_RETRIES unanswered REKEYs the client reattaches
    on its path, proven under its secret, which undoes the node's REKEY (it was stamped after
    it), and rekeys on the new binding."""
    net = Net(seed=163)
    params = replace(REKEY_PARAMS, rekey_after=1.0, reject_after=1.6, dead_after=100)
    c, gw = _rekey_session(net, params, keys_reject_after_s=1.6)
    rec = net.store.records[c.machine.session_id]
    jump = net.add_path(c, 2, OTHER, "gw-a")
    jump.up = False
    while rec.kg == 0 and net.now < 3.0:
        net.run(net.now + 0.001)
    assert rec.kg == 1 and not c.of(Rekeyed)
    c.machine.reattach(net.now, 2, UDP)  # the REKEY_ACK is on its way: it will be dropped
    while c.machine._req is not None and net.now < 5.0:  # noqa: SLF001
        net.run(net.now + 0.01)
    pump(net, c, net.now + 2.0)
    net.run(net.now + 0.1)
    assert c.of(Rekeyed), "the client never completed a REKEY again"
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received)


def test_a_copier_answered_first_and_relaying_loses_the_path_at_the_clients_next_packet() -> None:
    """The hardest order for a PENDING grant: the attacker's copy of the REATTACH_REQUEST is
    answered first (the grant's address is the attacker's), the attacker relays the ACK to
    the client, and copies the client's first packet under the granted epoch to the node
    from its own address before the genuine one arrives. That activates the binding at the
    attacker's address, as a relay on the path could anyway (RFC 9000 section 9.3.3). The
    client's very next packet, from its own address, is challenged; its PATH_RESPONSE moves
    the binding home: the attacker keeps the downlink for one round trip, then nothing."""
    net = Net(seed=167)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    net.inject("gw-b", ATTACKER, raw)  # the copy, answered at the attacker
    while not any(a == ATTACKER for a, _ in net.injected) and net.now < 1.0:
        net.run(net.now + 0.001)
    ack = next(d for a, d in net.injected if a == ATTACKER)
    c.machine.receive(ack, 2, net.now)  # the attacker relays the ACK
    [(_, first)] = c.machine.datagrams_to_send()  # the client's first packet under the grant
    gwb.machine.receive(first, Peer(UDP, ATTACKER), net.now)  # the copy, first
    net.run(net.now + 0.02)
    b = gwb.machine.bindings[sid]
    assert b.peer.addr == ATTACKER  # activated at the relay's address
    net.to_gateway(c.paths[2], first)  # the genuine one: a replay now
    net.run(net.now + 0.01)
    start = len(net.injected)
    t0 = net.now
    moved_at = None
    for _ in range(100):
        pump(net, c, net.now + 0.01)
        if b.peer.addr == OTHER and moved_at is None:
            moved_at = net.now
    assert moved_at is not None and moved_at - t0 <= 2 * net.latency + 0.03, moved_at
    after = [d for a, d in net.injected[start:] if a == ATTACKER]
    net.injected.clear()
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert not any(a == ATTACKER for a, _ in net.injected)
    assert b.peer.addr == OTHER and set(sent) <= set(c.received)
    assert len(after) <= 10, len(after)


def test_an_activate_answer_that_arrives_after_a_newer_grant_is_ignored() -> None:
    """activate.lua runs for the pending binding, but its answer reaches the node only after
    the client's next reattach granted a newer binding there. The late answer installs
    nothing (the node holds the newer grant, PENDING); the newer one activates with the
    client's packets, the store and the node agree on it, and no epoch is used twice."""
    net = Net(seed=173)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, UDP)
    while sid not in gw.machine.pending and net.now < 1.0:
        net.run(net.now + 0.001)
    p1 = gw.machine.pending[sid]
    net.store_latency = 0.3  # activate.lua's answer will come late
    while not any(isinstance(op, ActivateOp) for op in net.store.calls) and net.now < 1.0:
        net.run(net.now + 0.001)
    net.store_latency = 0.001
    assert rec.epoch == p1.epoch  # the store made p1 ACTIVE; the node does not know yet
    net.add_path(c, 3, ("198.51.100.3", 40002), "gw-a")
    c.machine.reattach(net.now, 3, UDP)
    t_end = net.now + 0.25
    while net.now < t_end:
        net.run(net.now + 0.001)
        assert gw.machine.bindings.get(sid) is not p1, "the late answer installed p1"
    p2 = gw.machine.pending.get(sid) or gw.machine.bindings[sid]
    assert p2.epoch > p1.epoch
    pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    b = gw.machine.bindings[sid]
    assert b is p2 and (rec.epoch, rec.bid) == (b.epoch, b.binding_id)
    assert sid not in gw.machine.pending
    sent = pump(net, c, net.now + 0.2)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received)
