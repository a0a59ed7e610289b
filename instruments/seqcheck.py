"""A long-lived TCP byte-sequence checker, run inside a test's network namespaces.

``serve HOST PORT``: accept connections; every byte must continue the sequence
``i % 251`` from the connection's start. Reports (JSON line, on stdin "report")
the connections seen with their peers, bytes received, order errors, the largest
gap between two receptions, and when it happened.

``send HOST PORT RATE``: one connection; sends the sequence at ``RATE`` bytes/s
(0: as fast as it can) in writes of up to 64 KiB; on stdin "report" prints its
local and remote address, bytes sent and any error; "stop" ends it.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

MOD = 251
PATTERN = bytes(i % MOD for i in range(MOD * 261))  # whole periods, > 64 KiB


def serve(host: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    lock = threading.Lock()
    conns: list[dict[str, object]] = []

    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        st: dict[str, object] = {"peer": f"{peer[0]}:{peer[1]}", "bytes": 0, "errors": 0,
                                 "max_gap_s": 0.0, "gap_at_byte": 0, "phase_gap_s": 0.0,
                                 "closed": False}
        with lock:
            conns.append(st)
        n, last = 0, time.monotonic()
        while True:
            try:
                data = conn.recv(262144)
            except OSError as exc:
                st["closed"] = f"error {exc}"
                break
            now = time.monotonic()
            if not data:
                st["closed"] = "eof"
                break
            gap = now - last
            last = now
            with lock:
                if gap > float(st["max_gap_s"]):  # type: ignore[arg-type]
                    st["max_gap_s"] = gap
                    st["gap_at_byte"] = n
                if gap > float(st["phase_gap_s"]):  # type: ignore[arg-type]
                    st["phase_gap_s"] = gap
                off = n % MOD
                want = (PATTERN[off:] + PATTERN * (len(data) // len(PATTERN) + 2))[:len(data)]
                if data != want:
                    st["errors"] = int(st["errors"]) + 1  # type: ignore[call-overload]
                n += len(data)
                st["bytes"] = n
        conn.close()

    def accept() -> None:
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    for line in sys.stdin:
        if line.strip() in ("report", "phase"):
            with lock:
                print(json.dumps({"connections": conns}), flush=True)
                if line.strip() == "phase":  # the largest gap since the previous "phase"
                    for c in conns:
                        c["phase_gap_s"] = 0.0
        elif line.strip() == "stop":
            break


def send(host: str, port: int, rate: float) -> None:
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    st: dict[str, object] = {"local": f"{local[0]}:{local[1]}",
                             "remote": f"{remote[0]}:{remote[1]}", "bytes": 0, "error": ""}
    stop = threading.Event()

    def pump() -> None:
        n, t0 = 0, time.monotonic()
        chunk = 65536 if rate <= 0 else max(1, min(65536, int(rate / 100)))
        while not stop.is_set():
            if rate > 0:
                due = t0 + n / rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.05))
                    continue
            off = n % MOD
            data = PATTERN[off:off + chunk]
            try:
                sent = sock.send(data)
            except OSError as exc:
                st["error"] = str(exc)
                return
            n += sent
            st["bytes"] = n

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    print(json.dumps({"connected": st["local"]}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "report":
            print(json.dumps(st), flush=True)
        elif cmd == "pause":
            stop.set()
            th.join(5)
            print(json.dumps({"paused": True}), flush=True)
        elif cmd == "stop":
            break
    stop.set()
    sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
