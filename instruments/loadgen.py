"""The datagram benches' compiled load generator and echo, and the bounded search for the
highest rate a path carries at < 0.5% loss.

Theory of operation. The compiled data plane costs a few microseconds per datagram; a
Python load generator and echo cost more than that, and on two cores they take the CPU the
plane under test needs, so the bench would measure its own driver. ``jvpn-loadgen`` (a
small Rust binary crate, ``instruments/loadgen/``) is that driver in compiled code:
``echo`` answers every datagram to its source, ``gen`` sends paced, numbered, timestamped
datagrams with a bounded in-flight window and reports rate, loss and RTT percentiles as
one JSON line; both batch their system calls (``recvmmsg``/``sendmmsg``). It is its own
crate and binary, not part of the data plane's module, so the product ships none of it;
a binary rather than a Python extension, so it runs as its own process (in a network
namespace too) and no interpreter sits on its path. ``binary()`` builds it with cargo
when it is missing or older than its sources.

``highest_rate`` is the search: from a start rate it doubles while a run passes (loss <
0.5% and the generator kept its pace), halves while none has, then bisects between the
highest pass and the lowest failure until they are within ``resolution``; every step is
one bounded run, and the search ends after ``max_steps`` runs or ``budget_s`` seconds,
whichever comes first.

System calls are counted per process by ``SyscallCount``: ``perf stat`` on the
``raw_syscalls:sys_enter`` tracepoint (every call of every thread, at almost no cost to
the process), else ``strace -c -f`` (which slows the process it counts), else not at all,
and the report says which.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CRATE = Path(__file__).resolve().parent / "loadgen"
BINARY = CRATE / "target" / "release" / "jvpn-loadgen"
TARGET_LOSS = 0.005
KEEP_PACE = 0.9  # a run passes only if the generator sent at least this share of its rate
MIN_SIZE, MAX_SIZE = 24, 2048  # a datagram carries seq, send time and run id; the buffers' size


class LoadgenUnavailable(RuntimeError):
    """The compiled load generator is not built and cannot be (no cargo)."""


def _sources() -> list[Path]:
    return [CRATE / "Cargo.toml", CRATE / "Cargo.lock", *sorted((CRATE / "src").glob("*.rs"))]


def binary(build: bool = True) -> Path:
    """The ``jvpn-loadgen`` binary, built (``cargo build --release``) if missing or stale."""
    newest = max((p.stat().st_mtime for p in _sources() if p.exists()), default=0.0)
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not build or not os.path.exists(cargo):
        raise LoadgenUnavailable(
            "the compiled load generator (instruments/loadgen) is not built "
            "and there is no Rust toolchain (cargo) to build it"
        )
    done = subprocess.run([cargo, "build", "--release", "-q", "--manifest-path",
                           str(CRATE / "Cargo.toml")], capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    if done.returncode != 0 or not BINARY.exists():
        raise LoadgenUnavailable(
            f"cargo build of instruments/loadgen failed:\n{done.stderr[-2000:]}"
        )
    BINARY.touch()  # cargo leaves an up-to-date binary's time alone
    return BINARY


class Echo:
    """A ``jvpn-loadgen echo`` process (``prefix``: e.g. ``ip netns exec NS``), ended by
    closing its stdin; ``stop()`` returns its counters."""

    def __init__(
        self, bind: str = "127.0.0.1:0", prefix: Sequence[str] = (), max_seconds: float = 3600.0
    ) -> None:
        self.argv = [
            *prefix,
            str(binary()),
            "echo",
            "--bind",
            bind,
            "--max-seconds",
            f"{max_seconds:g}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._err = tempfile.TemporaryFile()

    def start(self, timeout: float = 10.0) -> Echo:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err)  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            self._err.seek(0)
            raise RuntimeError(f"jvpn-loadgen echo did not start: {self._err.read()[-500:]!r}")
        self.info = json.loads(line)
        return self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.info["udp"]
        return str(host), int(port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.info.get("pid") or self.proc.pid)

    def stop(self) -> dict[str, Any]:
        proc, self.proc = self.proc, None
        if proc is None:
            return {}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # EOF: the echo prints its counters and exits
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        out = proc.stdout.read()
        proc.stdout.close()
        self._err.close()
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            stats: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except ValueError:
            stats = {}
        return stats


def run_gen(
    target: tuple[str, int],
    *,
    rate: float,
    seconds: float,
    warmup: float = 0.3,
    window: int = 4096,
    size: int = 1400,
    loss_timeout: float = 0.5,
    prefix: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``jvpn-loadgen gen`` run at ``rate`` datagrams/s (0: as fast as the window
    allows): its JSON result."""
    host, port = target
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv = [
        *prefix,
        str(binary()),
        "gen",
        "--target",
        addr,
        "--rate",
        f"{rate:.0f}",
        "--seconds",
        f"{seconds:g}",
        "--warmup",
        f"{warmup:g}",
        "--window",
        str(window),
        "--size",
        str(size),
        "--loss-timeout",
        f"{loss_timeout:g}",
    ]
    limit = warmup + seconds + loss_timeout + 15.0
    drops, sockets = udp_kernel_drops(), socket_drops()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"jvpn-loadgen gen failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not prefix:  # this network namespace's counters: where the generator ran
        result["kernel_udp_drops"] = udp_kernel_drops() - drops
        after = socket_drops()
        # which sockets overflowed: local port -> datagrams dropped (the generator's own
        # socket is gone by now; its drops are in the total only)
        result["socket_drops"] = {
            str(port): n - sockets.get(port, 0)
            for port, n in after.items()
            if n > sockets.get(port, 0)
        }
    return result


def udp_ports(pid: int) -> list[int]:
    """The local ports of a process's UDP sockets (its fds' socket inodes in /proc/net/udp*),
    to name the sockets ``socket_drops`` reports."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    return sorted(port for port, cells in _udp_sockets() if len(cells) > 9 and cells[9] in inodes)


def _udp_sockets() -> list[tuple[int, list[str]]]:
    """Each bound UDP socket of this network namespace (/proc/net/udp and udp6): its local
    port and the table's cells (a row that does not parse is left out)."""
    out = []
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name, encoding="ascii") as fp:
                rows = [line.split() for line in fp][1:]
        except OSError:
            continue
        for cells in rows:
            try:
                out.append((int(cells[1].rsplit(":", 1)[1], 16), cells))
            except (ValueError, IndexError):
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0.0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fp:
            fields = fp.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def socket_drops() -> dict[int, int]:
    """Datagrams dropped so far per bound UDP socket of this network namespace, by local
    port (/proc/net/udp and udp6, the ``drops`` column)."""
    out: dict[int, int] = {}
    for port, cells in _udp_sockets():
        try:
            out[port] = out.get(port, 0) + int(cells[-1])
        except ValueError:
            continue
    return out


def udp_kernel_drops() -> int:
    """RcvbufErrors of this network namespace's UDP stack: datagrams the kernel dropped
    because a socket's receive buffer was full."""
    try:
        with open("/proc/net/snmp", encoding="ascii") as fp:
            rows = [ln.split() for ln in fp if ln.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


def passes(result: dict[str, Any], target_loss: float = TARGET_LOSS) -> bool:
    """A run carried its rate: loss below the target, and the generator kept its pace."""
    kept = result["target_rate"] <= 0 or result["offered_rate"] >= KEEP_PACE * result["target_rate"]
    return bool(result["sent"] > 0 and result["loss"] < target_loss and kept)


def highest_rate(
    measure: Callable[[float], dict[str, Any]],
    *,
    start: float,
    max_rate: float = 1e6,
    max_steps: int = 10,
    budget_s: float = 60.0,
    resolution: float = 0.08,
    target_loss: float = TARGET_LOSS,
    confirm: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The highest paced rate ``measure`` carries at < ``target_loss``: at most ``max_steps``
    runs and ``budget_s`` seconds. With ``confirm``, a rate fails only if a second run at
    it fails too (a miss can be a neighbour's burst on a shared machine; each run counts
    as a step). Returns the best passing run (``best``; None if none passed), its delivered
    ``rate``, every step, and what ended the search."""
    if start <= 0 or max_rate < start or max_steps < 1 or resolution <= 0:
        raise ValueError("highest_rate: start > 0, max_rate >= start, max_steps >= 1")
    deadline = clock() + budget_s
    steps: list[dict[str, Any]] = []
    lo: float | None = None  # highest rate that passed
    hi: float | None = None  # lowest rate that failed
    best: dict[str, Any] | None = None
    rate = start
    ended = "step limit"
    missed: float | None = None  # a rate that failed once, not yet confirmed
    for _ in range(max_steps):
        if clock() >= deadline:
            ended = "time budget"
            break
        r = measure(rate)
        ok = passes(r, target_loss)
        steps.append(
            {
                "rate": round(rate),
                "ok": ok,
                "retry": missed == rate,
                "delivered": r["rate"],
                "loss": r["loss"],
                "offered": r["offered_rate"],
                "rtt_p99_us": r.get("rtt_p99_us"),
                "kernel_udp_drops": r.get("kernel_udp_drops"),
                "socket_drops": r.get("socket_drops"),
            }
        )
        if not ok and confirm and missed != rate:
            missed = rate  # once more at the same rate
            continue
        missed = None
        if ok and (lo is None or rate > lo):
            lo, best = rate, r
        if not ok and (hi is None or rate < hi):
            hi = rate
        if hi is None:  # nothing failed yet: up
            if rate >= max_rate:
                ended = "max rate"
                break
            rate = min(max_rate, rate * 2)
        elif lo is None:  # nothing passed yet: down
            rate /= 2
            if rate < start / 64:
                ended = "nothing passed"
                break
        else:
            if hi <= lo * (1 + resolution):
                ended = "resolved"
                break
            rate = math.sqrt(lo * hi)
    return {
        "rate": best["rate"] if best else 0.0,
        "target_rate": lo or 0.0,
        "best": best,
        "steps": steps,
        "ended_by": ended,
        "failed_at": hi,
    }


# ---- system calls --------------------------------------------------------------------------


def syscall_method() -> str | None:
    """How system calls are counted here: "perf", "strace" or None."""
    for tool in ("perf", "strace"):
        if shutil.which(tool):
            if tool == "perf" and not os.path.exists("/sys/kernel/tracing/events/raw_syscalls"):
                if not os.path.exists("/sys/kernel/debug/tracing/events/raw_syscalls"):
                    continue
            return tool
    return None


class SyscallCount:
    """System calls of some processes (all their threads) between ``start()`` and
    ``stop()``, one counting process each, ended by SIGINT (both tools print their counts
    then)."""

    def __init__(self, pids: dict[str, int], method: str | None = None) -> None:
        self.pids = pids
        self.method = method if method is not None else syscall_method()
        self._procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="jvpn-syscalls-")

    def start(self) -> SyscallCount:
        for name, pid in self.pids.items():
            out = Path(self._tmp.name) / f"{name}.txt"
            if self.method == "perf":
                argv = [
                    "perf",
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    "raw_syscalls:sys_enter",
                    "-p",
                    str(pid),
                    "-o",
                    str(out),
                ]
            elif self.method == "strace":
                argv = ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", str(out)]
            else:
                continue
            self._procs[name] = (
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                out,
            )
        time.sleep(0.2 if self._procs else 0)  # attached before the measured run starts
        return self

    def stop(self) -> dict[str, int | None]:
        counts: dict[str, int | None] = dict.fromkeys(self.pids)
        for name, (proc, out) in self._procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            counts[name] = _parse_count(self.method, out)
        self._procs = {}
        self._tmp.cleanup()
        return counts


def _parse_count(method: str | None, out: Path) -> int | None:
    try:
        text = out.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        cells = line.split(",") if method == "perf" else line.split()
        if method == "perf" and len(cells) > 2 and cells[2].startswith("raw_syscalls:sys_enter"):
            return int(cells[0]) if cells[0].isdigit() else None
        # strace -c: "100.00    0.012345     1    12345    67 total"
        if method == "strace" and cells and cells[-1] == "total":
            nums = [c for c in cells[:-1] if c.isdigit()]
            return int(nums[1]) if len(nums) >= 2 else None
    return None
