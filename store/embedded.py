"""Run a private redis-server child: the store when none is configured, and in tests.

``EmbeddedRedis`` starts the Debian ``redis-server`` binary on a free loopback
port (or a given one) with persistence off (``--save ""``, no AOF) and its
working directory in a fresh temp dir, waits (bounded) until it answers PING,
and stops it with SIGTERM, then SIGKILL if it lingers. It only ever signals
the process it started (by its own Popen handle), can be started again on the
same port (outage tests), and every instance still running at interpreter
exit is stopped by an atexit hook.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from store.errors import StoreError

DEFAULT_BINARY = "/usr/bin/redis-server"
BINARY_ENV = "JVPN_REDIS_SERVER"
INSTALL_HINT = "apt-get install redis-server (or `make test`, which installs it)"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

_running: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


class EmbeddedRedisError(StoreError):
    """The embedded redis-server is missing, failed to start, or did not answer in time."""


def find_redis_server() -> str:
    """The redis-server binary ($JVPN_REDIS_SERVER, PATH, /usr/bin); raise with an install hint."""
    candidates = [os.environ.get(BINARY_ENV), shutil.which("redis-server"), DEFAULT_BINARY]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise EmbeddedRedisError(f"redis-server not found: {INSTALL_HINT}")


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PICK = 10000
_pick = random.SystemRandom()  # never the seeded module RNG: parallel runs must differ
_handed_out: set[int] = set()  # picked by this process: not picked again before it binds


def _below_ephemeral() -> Sequence[int]:
    """Ports the kernel never hands out by itself: below the ephemeral range."""
    try:
        with open(_EPHEMERAL_RANGE, encoding="ascii") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(_LOWEST_PICK, low) if low - _LOWEST_PICK >= 1000 else range(0)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int, udp_too: bool) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp_too else (socket.SOCK_STREAM,)
    with contextlib.ExitStack() as stack:  # every kind held at once, then all released
        for kind in kinds:
            s = stack.enter_context(socket.socket(_family(host), kind))
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _os_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as t:
        t.bind((host, 0))
        return int(t.getsockname()[1])


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """A port that was free a moment ago (TCP, and UDP too if asked: one port for both).

    Picked at random below the kernel's ephemeral range: a port left free between
    this check and the server's bind (a restart, a process still starting) cannot
    be taken meanwhile by some client's outgoing socket, which the kernel numbers
    inside that range. The OS's own choice is the fallback (also when the range
    starts below 11000). A port is handed out once per process, so several picks
    made before anything binds (a cluster's gateway and admin ports) never clash;
    a server restarted on its port keeps that port by itself.
    """
    pool = _below_ephemeral()
    for attempt in range(300):
        port = _pick.choice(pool) if pool and attempt < 200 else _os_port(host)
        if port not in _handed_out and _bindable(host, port, udp_too):
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {host}")


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING with PONG (raw RESP, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_pid(host: str, port: int, timeout: float = 0.5) -> int | None:
    """The process_id a Redis server reports (INFO server), or None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


class EmbeddedRedis:
    """A redis-server child process owned by this object."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else 0
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log: str | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> str | None:
        return self._dir

    def start(self) -> Self:
        """Start (or restart, same port) and wait until PING answers; idempotent."""
        if self.running:
            return self
        binary = self.binary or find_redis_server()
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise EmbeddedRedisError(f"redis-server not found at {binary}: {INSTALL_HINT}")
        created = self._dir is None
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="jvpn-redis-")
            self._log = os.path.join(self._dir, "redis.log")
        try:
            return self._start(binary)
        except BaseException:
            if created:  # a failed first start leaves nothing behind
                self.close()
            raise

    def _start(self, binary: str) -> Self:
        attempts = 1 if (self._fixed_port or self.port) else 3
        last = ""
        for _ in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn(binary)
                return self
            except EmbeddedRedisError as exc:
                last = str(exc)
                if "in use" not in last or self._fixed_port:
                    raise
                self.port = 0  # lost the race for that port: pick another
        raise EmbeddedRedisError(last)

    def _spawn(self, binary: str) -> None:
        assert self._dir is not None and self._log is not None
        args = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._dir, close_fds=True,
            )  # fmt: skip
        _running.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self._proc = None
                reason = "port in use" if "already in use" in tail else "exited"
                raise EmbeddedRedisError(
                    f"redis-server on {self.host}:{self.port} {reason} at startup:\n{tail}"
                )
            # Ready when OUR child answers: another server on the port would answer too.
            if server_pid(self.host, self.port, timeout=0.2) == self._proc.pid:
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(
            f"redis-server on {self.host}:{self.port} did not answer PING within "
            f"{self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM our child, wait, SIGKILL if it lingers. The port stays ours for ``start``."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def close(self) -> None:
        """Stop and remove the temp dir."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = self._log = None

    def log_tail(self, lines: int = 20) -> str:
        if not self._log or not os.path.exists(self._log):
            return ""
        with open(self._log, "rb") as fp:
            return b"\n".join(fp.read().splitlines()[-lines:]).decode("utf-8", "replace")

    async def astart(self) -> Self:
        """``start`` without blocking the event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url}, pid={self.pid}, running={self.running})"


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.close()
