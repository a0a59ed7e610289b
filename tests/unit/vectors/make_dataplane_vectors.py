"""Write the data plane's shared test vectors from the Python reference.

    python tests/unit/vectors/make_dataplane_vectors.py

``dataplane_framing.json``: one binding's keys, session and epoch, the packets the
sender seals (inner and wire bytes), then a receive script: packets in order, each
with what the receiver must answer (the plaintext, or an error class and DropReason).
``replay_window.json``: counters in order, each with the answer of check and update.
Both the Python tests and the crate's ``cargo test`` read them; regenerate only on
purpose (a wire change), never to make a failing test pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from session import wire
from session.errors import RemoteProtocolError
from session.framing import DataChannel
from session.replay import REPLAY_WINDOW, ReplayWindow

HERE = Path(__file__).parent
SEND_KEY = bytes(range(32))
RECV_KEY = bytes(range(32, 64))
SID = bytes.fromhex("00112233445566778899aabbccddeeff")
EPOCH = 0x01020304


def framing() -> dict[str, object]:
    tx = DataChannel(SEND_KEY, RECV_KEY, SID, EPOCH)
    inners = [b"\x01", wire.inner_payload(b"hello"), wire.inner_keepalive(7, 123456, 2),
              wire.inner_payload(bytes(range(256)) * 5), wire.inner_path_response(b"12345678")]
    sealed = [tx.seal(i) for i in inners]
    late = [tx.seal(wire.inner_payload(b"late %d" % i)) for i in range(3)]
    other_epoch = DataChannel(SEND_KEY, RECV_KEY, SID, EPOCH + 1).seal(b"\x01x")
    forged = bytearray(sealed[3])  # not yet received: the tag, not the window, refuses it
    forged[-1] ^= 0x40
    script = [
        ("genuine", sealed[0]), ("genuine, out of order", sealed[2]), ("late but in window", sealed[1]),
        ("replay", sealed[2]), ("forged tag", bytes(forged)), ("truncated header", sealed[3][:30]),
        ("one byte short of a DATA packet", sealed[3][:48]), ("stale epoch", other_epoch),
        ("bad version", b"\x02" + sealed[4][1:]), ("flags set", sealed[4][:3] + b"\x01" + sealed[4][4:]),
        ("other session", sealed[4][:4] + b"\xff" * 16 + sealed[4][20:]),
        ("counter past REJECT_AFTER_MESSAGES", sealed[4][:24] + (2**60).to_bytes(8, "big") + sealed[4][32:]),
        ("oversized", sealed[4] + b"\x00" * 2048), ("genuine", sealed[4]),
        ("genuine", late[2]), ("genuine", late[0]), ("replay", late[0]), ("genuine", sealed[3]),
    ]
    rx = DataChannel(RECV_KEY, SEND_KEY, SID, EPOCH)
    steps = []
    for what, raw in script:
        try:
            msg = wire.decode(raw)
            assert isinstance(msg, wire.Data)
            answer = {"plain": rx.open(msg, raw).hex()}
        except RemoteProtocolError as exc:
            answer = {"error": type(exc).__name__, "reason": exc.reason.name, "code": int(exc.reason)}
        steps.append({"what": what, "packet": raw.hex(), **answer})
    return {
        "send_key": SEND_KEY.hex(), "recv_key": RECV_KEY.hex(), "session_id": SID.hex(), "epoch": EPOCH,
        "sealed": [{"inner": i.hex(), "packet": p.hex()} for i, p in zip(inners, sealed, strict=True)],
        "receive": steps,
    }


def replay() -> dict[str, object]:
    w = ReplayWindow()
    top = 2**64 - 1
    counters = [0, 0, 1, 5, 3, 5, 64, 63, 4096, 0, 1, 2, 4097, 2, 3, 10_000, 10_000 - REPLAY_WINDOW,
                10_000 - REPLAY_WINDOW + 1, 9_999, 20_000, 15_905, 15_904, 15_903, top - 1, top,
                top - REPLAY_WINDOW, top - REPLAY_WINDOW + 1, top - 1, 20_001]
    steps = []
    for c in counters:
        check = w.check(c)
        steps.append({"counter": str(c), "check": check, "update": w.update(c),
                      "highest": None if w.highest is None else str(w.highest)})
    return {"window": REPLAY_WINDOW, "steps": steps}


if __name__ == "__main__":
    for name, data in (("dataplane_framing.json", framing()), ("replay_window.json", replay())):
        (HERE / name).write_text(json.dumps(data, indent=1) + "\n")
        print("wrote", HERE / name)
