"""The gateway machine with QUIC peers, in memory: a QUIC connection is one peer
(``Peer(QUIC, address, connection)``); a session moves onto a new QUIC connection only
through its reattach, while QUIC's own migration (a new address on the same
connection) is a new path of the binding, challenged as a UDP one is."""

from __future__ import annotations

from session import wire
from session.binding import Peer
from session.client import Reattached
from session.reasons import DropReason
from tests.support.memnet import Gw, Net
from tests.unit.test_machines import OTHER, setup

QUIC = wire.TransportKind.QUIC
CONN, OTHER_CONN = 7, 8
MIGRATED = ("198.51.100.3", 40003)


def _drops(gw: Gw, reason: DropReason) -> int:
    return sum(1 for a, _ in gw.metrics.named("count_drop") if a == (reason, QUIC))


def _to(gw: Gw, peer: Peer) -> list[bytes]:
    return [d for p, d in gw.sent if p == peer]


def test_a_session_moves_onto_a_quic_connection_only_by_its_reattach() -> None:
    net = Net(seed=131)
    c, (gw,) = setup(net)
    sid = c.machine.session_id
    quic, other = Peer(QUIC, OTHER, CONN), Peer(QUIC, OTHER, OTHER_CONN)

    # The reattach arrives on QUIC connection CONN: a PENDING binding there.
    c.machine.reattach(net.now, 2, QUIC)
    [(_, raw)] = c.machine.datagrams_to_send()
    gw.machine.receive(raw, quic, net.now)
    net.run(net.now + 0.01)
    assert sid in gw.machine.pending and gw.machine.pending[sid].peer == quic
    [ack] = _to(gw, quic)
    c.machine.receive(ack, 2, net.now)
    assert c.of(Reattached) or c.machine.epoch == gw.machine.pending[sid].epoch
    first = [d for path, d in c.machine.datagrams_to_send() if path == 2]
    assert first  # the keepalive that validates the new path

    # The client's first packet, copied onto another QUIC connection: dropped, the pending
    # binding neither validates nor moves there.
    before = _drops(gw, DropReason.UNEXPECTED)
    gw.machine.receive(first[0], other, net.now)
    gw.flush()
    assert _drops(gw, DropReason.UNEXPECTED) == before + 1
    p = gw.machine.pending[sid]
    assert p.peer == quic and not p.validated and not _to(gw, other)

    # From its own connection it validates, and the binding becomes ACTIVE there.
    gw.machine.receive(first[0], quic, net.now)
    net.run(net.now + 0.01)
    assert sid not in gw.machine.pending and gw.machine.bindings[sid].peer == quic

    # ACTIVE: DATA on another QUIC connection is dropped too, and moves nothing.
    before = _drops(gw, DropReason.UNEXPECTED)
    c.machine.send(b"over quic", net.now)
    data = [d for path, d in c.machine.datagrams_to_send() if path == 2]
    gw.machine.receive(data[0], other, net.now)
    gw.flush()
    assert _drops(gw, DropReason.UNEXPECTED) == before + 1
    assert gw.machine.bindings[sid].peer == quic and not _to(gw, other)

    # QUIC migration (same connection, new address) is a new path: challenged, not adopted.
    migrated = Peer(QUIC, MIGRATED, CONN)
    c.machine.send(b"after migration", net.now)
    data = [d for path, d in c.machine.datagrams_to_send() if path == 2]
    gw.machine.receive(data[0], migrated, net.now)
    gw.flush()
    [challenge] = _to(gw, migrated)
    assert len(challenge) <= 3 * len(data[0])  # within the new address's budget
    assert gw.machine.bindings[sid].peer == quic
