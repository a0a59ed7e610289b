"""QUIC shapes, in memory: the connection IDs a gateway chooses (QUIC-LB) and the
impairment that passes only QUIC (instruments/netsim.py QuicShape)."""

from __future__ import annotations

from qh3.quic.connection import QuicConnection

from agent.quic import client_configuration
from gateway.quic_config import CID_LEN, default_server_id, node_cid, server_id_of
from instruments.netsim import QuicShape
from session import PROTOCOL_VERSION

CLIENT = ("127.0.0.1", 40000)


def test_node_connection_ids_name_their_node() -> None:
    for sid in (0, 1, 0xBEEF, 0xFFFF):
        cid = node_cid(sid)
        assert len(cid) == CID_LEN and server_id_of(cid) == sid
    assert node_cid(7) != node_cid(7)  # the rest is random
    assert server_id_of(b"\x00" * CID_LEN) is None and server_id_of(b"\x07\x00") is None
    assert default_server_id("gw-1") == default_server_id("gw-1") != default_server_id("gw-2")


def _initial() -> bytes:
    q = QuicConnection(configuration=client_configuration())
    q.connect(("127.0.0.1", 443), now=0.0)
    return q.datagrams_to_send(now=0.0)[0][0]


def test_quic_shape_passes_only_a_quic_connection() -> None:
    shape = QuicShape()
    session_msg = bytes([PROTOCOL_VERSION]) + bytes(40)  # a session message's first bytes
    assert not shape.up(session_msg, CLIENT)  # the session's own UDP: not QUIC
    init = _initial()
    assert len(init) >= 1200
    assert not shape.up(init[:1000], CLIENT)  # too short for an Initial
    short = bytes([0x40]) + b"\x07\xbe\xef12345" + bytes(30)
    assert not shape.up(short, CLIENT)  # no flow yet
    assert shape.up(init, CLIENT)  # an Initial opens the flow
    assert not shape.down(session_msg, CLIENT)
    # The server's long header names its connection ID; short headers to it pass.
    scid = b"\x07\xbe\xef12345"
    server_long = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + b"C" * 8 + bytes([8]) \
        + scid + bytes(20)
    assert shape.down(server_long, CLIENT)
    assert shape.up(short, CLIENT)
    assert not shape.up(bytes([0x40]) + b"\x07other!!" + bytes(30), CLIENT)  # another CID
    assert not shape.up(session_msg, CLIENT)  # still not QUIC
    assert not shape.up(short, ("127.0.0.1", 40001))  # another flow
