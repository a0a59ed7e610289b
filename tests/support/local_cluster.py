"""``jvpn-lab cluster up`` for tests: driven through the CLI, as an operator would.

``LocalCluster(run_dir).up(...)`` runs ``python -m instruments cluster up`` in a
run directory of the test's own and returns ``cluster.json``; ``down()`` runs
``jvpn-lab cluster down`` and then reaps the processes. Reaping: ``up`` exits
after starting its children, so they are re-parented; while ``up`` runs this
process is a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so they are
re-parented to us and we can collect their exit status instead of leaving
zombies behind on a machine whose PID 1 does not reap.

``require_binary`` implements the rule for the cluster tests: a missing
binary is a skip only when we are not root (as root, ``make deps`` installs
it, so a missing one is a failure).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from instruments.cluster import is_alive

ROOT = Path(__file__).resolve().parents[2]
PR_SET_CHILD_SUBREAPER = 36


def require_binary(name: str, package: str, *extra_paths: str) -> str:
    """Path of ``name``; skip (not root) or fail (root: `make deps` installs it) when missing."""
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}", *extra_paths):
        if path and os.path.exists(path):
            return path
    msg = f"{name} not found (Debian package {package}; `make deps` installs it)"
    if os.geteuid() != 0:
        pytest.skip(msg + " and we are not root")
    pytest.fail(msg, pytrace=False)


def require_cluster_binaries(prometheus: bool = False) -> None:
    require_binary("redis-server", "redis-server")
    require_binary("nginx", "nginx")
    require_binary("ngx_stream_js_module.so", "libnginx-mod-stream-js",
                   "/usr/lib/nginx/modules/ngx_stream_js_module.so")
    if prometheus:
        require_binary("prometheus", "prometheus")


def _subreaper(on: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)


class LocalCluster:
    """One ``jvpn-lab cluster`` run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.state: dict[str, Any] = {}

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``jvpn-lab cluster <args> --run-dir <run dir>``, bounded."""
        return subprocess.run(
            [sys.executable, "-m", "instruments", "cluster", *args, "--run-dir", str(self.run_dir)],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def up(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        _subreaper(True)
        try:
            res = self.cli("up", *args, timeout=timeout)
        finally:
            _subreaper(False)
        self.load()
        if res.returncode != 0:
            self.down()
            raise AssertionError(f"jvpn-lab cluster up failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        self.up_output = res.stdout
        return self.state

    def restart(self, node: str, *args: str, timeout: float = 60.0) -> str:
        """``jvpn-lab cluster restart <node> <args>`` (the new process becomes our child to
        reap); its output."""
        _subreaper(True)
        try:
            res = self.cli("restart", node, *args, timeout=timeout)
        finally:
            _subreaper(False)
        self.reap()  # the old gateway, if it was ours
        self.load()
        if res.returncode != 0:
            raise AssertionError(f"jvpn-lab cluster restart {node} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res.stdout

    def load(self) -> dict[str, Any]:
        path = self.run_dir / "cluster.json"
        self.state = json.loads(path.read_text()) if path.exists() else {}
        return self.state

    def down(self) -> subprocess.CompletedProcess[str] | None:
        if not self.state:
            return None
        res = self.cli("down", timeout=60.0)
        self.reap()
        return res

    def reap(self, timeout: float = 5.0) -> None:
        """Collect the exit status of every recorded process that became our child and
        has ended (a zombie counts as ended); live ones are left alone."""
        deadline = time.monotonic() + timeout
        for p in self.state.get("processes", []):
            if is_alive(p["pid"], p["start_ticks"]):
                continue
            while True:
                try:
                    pid, _ = os.waitpid(p["pid"], os.WNOHANG)
                except ChildProcessError:
                    break  # not our child (or already reaped)
                if pid or time.monotonic() > deadline:
                    break
                time.sleep(0.02)

    def alive(self) -> list[str]:
        """Names of the recorded processes still running."""
        return [p["name"] for p in self.state.get("processes", [])
                if is_alive(p["pid"], p["start_ticks"])]

    @property
    def udp(self) -> tuple[str, int]:
        host, _, port = self.state["balancer"]["udp"].rpartition(":")
        return host, int(port)

    @property
    def tcp(self) -> tuple[str, int]:
        host, _, port = self.state["balancer"]["tcp"].rpartition(":")
        return host, int(port)

    @property
    def public_key(self) -> bytes:
        return bytes.fromhex(self.state["gateway_public_key"])

    @property
    def store_url(self) -> str:
        return str(self.state["store_url"])

    @property
    def registry_key(self) -> bytes:
        """The key MACing the cluster's client registry (from the launcher's KEK file)."""
        from session.keys import registry_key
        from settings import decode_key

        return registry_key(decode_key((self.run_dir / "keys" / "kek.key").read_text()))
