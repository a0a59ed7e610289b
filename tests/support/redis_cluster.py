"""A real three-master Redis Cluster for tests: six redis-server children on loopback.

``RedisClusterProcesses`` starts six ``store.embedded.EmbeddedRedis`` processes
(3 masters + 3 replicas) with cluster mode on, each on a free client port and
a free cluster-bus port (``--cluster-port``: the default port + 10000 may not
exist for a high ephemeral port), joins them with ``redis-cli --cluster create
... --cluster-replicas 1``, and waits (bounded) until every node reports
``cluster_state:ok`` and every master has an online replica. ``kill_master``
SIGKILLs the process (by the PID of a child it started) that owns a slot and
waits until its replica has taken over; ``restart`` brings a killed node back
(it rejoins as a replica); ``stop`` ends only its own children::

    with RedisClusterProcesses() as cluster:
        print(cluster.url)              # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...
        cluster.kill_master(slot=1234)  # failover
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import redis
from redis.crc import key_slot

from store.embedded import EmbeddedRedis, EmbeddedRedisError, free_port
from tests.support.redis_server import redis_server_binary

__all__ = ["ClusterNodeProcess", "RedisClusterProcesses", "redis_cli_binary"]

MASTERS = 3
NODE_TIMEOUT_MS = 1000
STARTUP_TIMEOUT_S = 20.0
FAILOVER_TIMEOUT_S = 20.0
HOST = "127.0.0.1"


def redis_cli_binary() -> str:
    """Path of redis-cli (next to redis-server, or on PATH)."""
    server = redis_server_binary()
    for path in (os.path.join(os.path.dirname(server), "redis-cli"), shutil.which("redis-cli")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise EmbeddedRedisError("redis-cli not found: apt-get install redis-tools")


class ClusterNodeProcess(EmbeddedRedis):
    """One cluster-enabled redis-server child (its port is fixed: the cluster knows it)."""

    def __init__(self, port: int, bus_port: int, conf_dir: str) -> None:
        super().__init__(
            port=port,
            host=HOST,
            binary=redis_server_binary(),
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(conf_dir, f"nodes-{port}.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-port", str(bus_port),
                "--repl-diskless-sync-delay", "0",  # default waits 5 s for more replicas
            ),
        )  # fmt: skip
        self.bus_port = bus_port

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)  # fmt: skip


class RedisClusterProcesses:
    """Six cluster-enabled redis-server children, joined into one cluster."""

    def __init__(self, masters: int = MASTERS, startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.masters = masters
        self.startup_timeout = startup_timeout
        self.nodes: list[ClusterNodeProcess] = []
        self._dir: str | None = None

    # ---- addresses ---------------------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        """The store URL selecting cluster mode, listing every node as a startup node."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    @property
    def live_nodes(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.running]

    def node_by_port(self, port: int) -> ClusterNodeProcess:
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the six processes, create the cluster, wait until it is ok (bounded)."""
        if self.nodes:
            return self
        self._dir = tempfile.mkdtemp(prefix="jvpn-cluster-")
        try:
            for _ in range(self.masters * 2):
                self.nodes.append(self._start_node())
            self._create()
            self.wait_ok(self.startup_timeout, replicas=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self) -> ClusterNodeProcess:
        assert self._dir is not None
        taken = {p for n in self.nodes for p in (n.port, n.bus_port)}
        for _ in range(5):  # a port taken between free_port() and bind(): pick again
            port, bus = free_port(HOST), free_port(HOST)
            if port == bus or port in taken or bus in taken:
                continue
            node = ClusterNodeProcess(port, bus, self._dir)
            try:
                return node.start()
            except EmbeddedRedisError as exc:
                node.close()
                if "in use" not in str(exc):
                    raise
        raise EmbeddedRedisError("no free port pair for a cluster node")

    def _create(self) -> None:
        args = [redis_cli_binary(), "--cluster", "create",
                *(f"{h}:{p}" for h, p in self.startup_nodes),
                "--cluster-replicas", "1", "--cluster-yes"]  # fmt: skip
        try:
            out = subprocess.run(args, capture_output=True, timeout=self.startup_timeout,
                                 stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedRedisError(f"redis-cli --cluster create hung: {exc}") from None
        text = (out.stdout + out.stderr).decode("utf-8", "replace")
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in text:
            raise EmbeddedRedisError(f"redis-cli --cluster create failed:\n{text[-2000:]}")

    def stop(self) -> None:
        """Stop every child this object started and remove the temp dir."""
        for node in self.nodes:
            node.close()
        self.nodes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- state -------------------------------------------------------------------------------

    def _ask(self, node: ClusterNodeProcess, *cmd: str) -> object:
        c = node.client()
        try:
            return c.execute_command(*cmd)
        finally:
            c.close()

    def cluster_info(self, node: ClusterNodeProcess) -> dict[str, str]:
        raw = self._ask(node, "CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as a live node reports it (CLUSTER SLOTS)."""
        for node in self.live_nodes:
            try:
                raw = self._ask(node, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            assert isinstance(raw, list)
            return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw)
        raise EmbeddedRedisError("no live cluster node answers CLUSTER SLOTS")

    def slot_owners(self) -> dict[int, int]:
        """Slot range start -> master port."""
        return {first: port for first, _, port in self.slot_ranges()}

    def master_of_slot(self, slot: int) -> ClusterNodeProcess:
        """The node a live node names as the owner of ``slot``."""
        for first, last, port in self.slot_ranges():
            if first <= slot <= last:
                return self.node_by_port(port)
        raise EmbeddedRedisError(f"no live node names an owner of slot {slot}")

    def master_of_key(self, key: str | bytes) -> ClusterNodeProcess:
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def masters_now(self) -> list[ClusterNodeProcess]:
        """Live nodes that are masters (INFO replication), by port."""
        out = []
        for node in self.live_nodes:
            try:
                role = self._ask(node, "ROLE")
            except redis.RedisError:
                continue
            if isinstance(role, list) and role and role[0] in (b"master", "master"):
                out.append(node)
        return out

    def replicas_of(self, master: ClusterNodeProcess) -> list[ClusterNodeProcess]:
        """Live nodes replicating ``master`` (ROLE)."""
        out = []
        for node in self.live_nodes:
            try:
                role = self._ask(node, "ROLE")
            except redis.RedisError:
                continue
            if (
                isinstance(role, list)
                and role[0] in (b"slave", "slave")
                and int(role[2]) == master.port
            ):
                out.append(node)
        return out

    def _healthy(self, replicas: bool) -> bool:
        live = self.live_nodes
        try:
            if not all(self.cluster_info(n).get("cluster_state") == "ok" for n in live):
                return False
            if replicas:
                for n in live:
                    c = n.client()
                    try:
                        info = c.info("replication")
                    finally:
                        c.close()
                    if info.get("role") == "master":
                        online = [v for k, v in info.items() if k.startswith("slave")
                                  and isinstance(v, dict) and v.get("state") == "online"]  # fmt: skip
                        if not online:
                            return False
        except redis.RedisError:
            return False
        return True

    def wait_ok(self, timeout: float = STARTUP_TIMEOUT_S, *, replicas: bool = False) -> None:
        """Until every live node says cluster_state:ok (and, with ``replicas``, every master
        has an online replica); raise after ``timeout``."""
        self._wait(lambda: self._healthy(replicas), timeout, "cluster_state:ok")

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        states = {n.port: self.cluster_info(n).get("cluster_state") for n in self.live_nodes}
        raise EmbeddedRedisError(f"cluster not {what} within {timeout:.0f} s: {states}")

    # ---- faults ------------------------------------------------------------------------------

    def kill_master(
        self, slot: int | None = None, *, index: int | None = None, wait: bool = True
    ) -> ClusterNodeProcess:
        """SIGKILL the master owning ``slot`` (or the ``index``-th master by port); with
        ``wait``, return once its replica owns the slots and the cluster is ok again."""
        if slot is not None:
            victim = self.master_of_slot(slot)
        else:
            victim = sorted(self.masters_now(), key=lambda n: n.port)[index or 0]
        owned = [s for s, port in self.slot_owners().items() if port == victim.port]
        pid = victim.pid
        assert pid is not None and victim.running
        os.kill(pid, signal.SIGKILL)  # our own child, by its PID
        victim.stop()  # reaps it (already dead: no further signal)
        if wait:
            self.wait_failover(victim, owned)
        return victim

    def wait_failover(
        self, victim: ClusterNodeProcess, slots: list[int], timeout: float = FAILOVER_TIMEOUT_S
    ) -> None:
        """Until every slot range in ``slots`` has a live owner and the cluster is ok."""

        def done() -> bool:
            try:
                owners = self.slot_owners()
            except EmbeddedRedisError:
                return False
            live = {n.port for n in self.live_nodes}
            return all(owners.get(s) in live for s in slots) and self._healthy(False)

        self._wait(done, timeout, f"failed over from {victim.port}")

    def restart(self, node: ClusterNodeProcess, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start a killed node again (same port and config: it rejoins as a replica) and
        wait until every master has an online replica."""
        node.start()

        def synced() -> bool:
            c = node.client()
            try:
                info = c.info("replication")
            except redis.RedisError:
                return False
            finally:
                c.close()
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait(synced, timeout, f"rejoined ({node.port} a synced replica)")
        self.wait_ok(timeout, replicas=True)

    def flush(self) -> None:
        """FLUSHALL on every live master (replicas follow)."""
        for node in self.masters_now():
            self._ask(node, "FLUSHALL")

    def __repr__(self) -> str:
        return f"RedisClusterProcesses({self.url})"
