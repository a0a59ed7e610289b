"""A lab of network namespaces for the L3 tunnel (its tests and the demo).

A client, the nginx balancer, N gateway nodes, a server side.

Topology (every namespace and interface created here, every one removed by ``close``,
also after a failure; processes are ended by their own pid)::

    client 10.97.0.10 -- "front" -- nginx 10.97.0.250 | 10.98.0.250 --+
                                                                        | "out" bridge
                        +-- in0 gw-i 10.99.0.i / fd99::i                 | redis 10.98.0.200
    "in" bridge (core)  |                             gw-i out0 10.98.0.i --+
                        +-- server 10.99.0.100 / fd99::100

The client knows one gateway address, the balancer's (the real nginx with the
deploy template and ``jvpn.js``, as ``jvpn-lab cluster up`` runs it: UDP, TCP and
QUIC on 51820/51821, session-affine); it reaches neither the nodes nor the server
side but through nginx and the tunnel. The nodes believe the client's address only
from nginx (``trusted_balancers``). Routed egress: the server routes the inner pools
to the cluster's return addresses 10.99.0.254 and fd99::254, which one node at a
time holds.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from session.noise import generate_keypair

FRONT_NET = "10.97.0"
BALANCER = f"{FRONT_NET}.250"
BALANCER_BACK = "10.98.0.250"
OUT_NET = "10.98.0"
IN_NET = "10.99.0"
IN_NET6 = "fd99::"
POOL_V4 = "10.77.0.0/24"
POOL_V6 = "fd77::/64"
VIP = f"{IN_NET}.254"
VIP6 = f"{IN_NET6}254"
SERVER = f"{IN_NET}.100"
SERVER6 = f"{IN_NET6}100"
REDIS_PORT = 6390
GW_PORT = 51820
QUIC_PORT = 51821
RELAY_PORT = 51830
NGINX_FAIL = "max_fails=1 fail_timeout=2s"
_COUNTER = itertools.count(1)


def missing_prerequisites() -> str | None:
    """Why the L3 lab cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN, nftables)"
    for tool in ("ip", "nft", "redis-server", "curl", "ping", "nginx"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    from instruments.cluster import ClusterError, find_binary, nginx_modules

    try:
        nginx_modules(find_binary("nginx"))
    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
        return f"nginx cannot run the balancer: {exc}"
    return None


def sh(*args: str, check: bool = True, timeout: float = 20.0) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


class Proc:
    """A child process in a namespace with a line-oriented JSON stdin/stdout."""

    def __init__(self, ns: str, argv: list[str], log: Path, env: dict[str, str],
                 stop_signal: int | None = None) -> None:
        self.log = log
        self.stop_signal = stop_signal  # ended by this signal, not by "stop" on its stdin
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._err, env=env, text=True,
                                  bufsize=1)
        self.pid = self.p.pid
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._lines.put(line)

    def line(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            raw = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer within {timeout}s; log {self.log}:\n"
                                 f"{self.tail()}") from None
        result: dict[str, Any] = json.loads(raw)
        return result

    def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        return self.line(timeout)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        """SIGKILL, by pid (the ``ip netns exec`` child execs the program: same pid)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.p.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive() and self.stop_signal is not None:
            os.kill(self.pid, self.stop_signal)
        if self.alive():
            try:
                if self.p.stdin is not None:
                    self.p.stdin.write("stop\n")
                    self.p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.p.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
        self._err.close()


class Lab:
    """The namespaces, the store, the gateway nodes and the helpers of one test."""

    def __init__(self, tmp: Path, gateways: int = 3, egress: str = "routed",
                 balancer: bool = True) -> None:
        """``balancer=False``: no nginx; the client sits on the nodes' own segment
        (10.98.0.10) and knows every node's address (the throughput bench's bare path)."""
        self.tmp = tmp
        self.with_balancer = balancer
        self.client_net = FRONT_NET if balancer else OUT_NET
        self.client_ip = f"{self.client_net}.10"
        self.tag = f"jv{os.getpid() % 100000}{secrets.token_hex(2)}n{next(_COUNTER)}"
        self.egress = egress
        self.n = gateways
        self.core, self.client, self.server = (f"{self.tag}core", f"{self.tag}c",
                                               f"{self.tag}s")
        self.balancer = f"{self.tag}b"
        self.gws = [f"{self.tag}g{i}" for i in range(1, gateways + 1)]
        self.namespaces: list[str] = []
        self.procs: list[Proc] = []
        self.gw_procs: dict[int, Proc] = {}
        self.env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", os.getcwd()),
                        PYTHONUNBUFFERED="1")
        self.gw_priv, self.gw_pub = generate_keypair()
        self.kek = secrets.token_bytes(32)
        for name, key in (("gw.key", self.gw_priv), ("kek.key", self.kek)):
            (tmp / name).write_text(key.hex())
            (tmp / name).chmod(0o600)
        self.store_url = f"redis://{OUT_NET}.200:{REDIS_PORT}/0"

    # ---- topology --------------------------------------------------------------------------

    def up(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _port(self, bridge: str, ns: str, ifname: str, short: str) -> None:
        """A veth from ``bridge`` (in core, named ``short``) to ``ifname`` in ``ns``."""
        sh("ip", "-n", self.core, "link", "add", "name", short, "type", "veth", "peer", "name",
           ifname, "netns", ns)
        sh("ip", "-n", self.core, "link", "set", short, "master", bridge, "up")
        sh("ip", "-n", ns, "link", "set", ifname, "up")

    def _build(self) -> None:
        spaces = [self.core, self.client, self.server, *self.gws]
        for ns in spaces + ([self.balancer] if self.with_balancer else []):
            self._ns(ns)
        for br in ("br-front", "br-out", "br-in"):
            sh("ip", "-n", self.core, "link", "add", "name", br, "type", "bridge")
            sh("ip", "-n", self.core, "link", "set", br, "up")
        sh("ip", "-n", self.core, "addr", "add", f"{OUT_NET}.200/24", "dev", "br-out")
        if self.with_balancer:
            self._port("br-front", self.client, "eth0", "f-c")
            self._port("br-front", self.balancer, "eth0", "f-b")
            sh("ip", "-n", self.balancer, "addr", "add", f"{BALANCER}/24", "dev", "eth0")
            self._port("br-out", self.balancer, "eth1", "o-b")
            sh("ip", "-n", self.balancer, "addr", "add", f"{BALANCER_BACK}/24", "dev", "eth1")
        else:
            self._port("br-out", self.client, "eth0", "o-c")
        sh("ip", "-n", self.client, "addr", "add", f"{self.client_ip}/24", "dev", "eth0")
        self._port("br-in", self.server, "eth0", "i-s")
        sh("ip", "-n", self.server, "addr", "add", f"{SERVER}/24", "dev", "eth0")
        sh("ip", "-n", self.server, "addr", "add", f"{SERVER6}/64", "dev", "eth0", "nodad")
        if self.egress == "routed":
            sh("ip", "-n", self.server, "route", "add", POOL_V4, "via", VIP)
            sh("ip", "-n", self.server, "-6", "route", "add", POOL_V6, "via", VIP6)
        for i, ns in enumerate(self.gws, 1):
            self._port("br-out", ns, "out0", f"o-g{i}")
            self._port("br-in", ns, "in0", f"i-g{i}")
            sh("ip", "-n", ns, "addr", "add", f"{OUT_NET}.{i}/24", "dev", "out0")
            sh("ip", "-n", ns, "addr", "add", f"{IN_NET}.{i}/24", "dev", "in0")
            sh("ip", "-n", ns, "addr", "add", f"{IN_NET6}{i}/64", "dev", "in0", "nodad")
        self.redis = self.spawn(self.core, ["redis-server", "--port", str(REDIS_PORT), "--bind",
                                            f"{OUT_NET}.200", "--save", "", "--appendonly", "no",
                                            "--protected-mode", "no"], "redis")
        self.wait_tcp(self.core, f"{OUT_NET}.200", REDIS_PORT)
        if self.with_balancer:
            self._start_nginx()

    def _start_nginx(self) -> None:
        """The deploy template's nginx in its own namespace, in front of every node."""
        from instruments.cluster import (
            DEPLOY_DIR_ENV,
            NGINX_TEMPLATE,
            find_binary,
            nginx_modules,
            nginx_values,
            render_template,
        )

        deploy = Path(os.environ.get(DEPLOY_DIR_ENV) or Path(__file__).parent.parent / "deploy")
        nginx = find_binary("nginx")
        conf_dir = self.tmp / "nginx"
        conf_dir.mkdir(exist_ok=True)
        pid_file = conf_dir / "nginx.pid"
        nodes = range(1, self.n + 1)
        values = nginx_values(
            listen=f"{BALANCER}:{GW_PORT}", quic_listen=f"{BALANCER}:{QUIC_PORT}",
            # nginx's passive health marks a node it got an error from down for
            # fail_timeout (10 s by default); the lab restarts killed nodes within a second
            # and kills the next one seconds later, so it gives a node back sooner
            udp_servers=[f"{OUT_NET}.{i}:{GW_PORT} {NGINX_FAIL}" for i in nodes],
            tcp_servers=[f"{OUT_NET}.{i}:{GW_PORT} {NGINX_FAIL}" for i in nodes],
            quic_servers=[f"{OUT_NET}.{i}:{QUIC_PORT} {NGINX_FAIL}" for i in nodes],
            quic_nodes=[(i, f"{OUT_NET}.{i}:{QUIC_PORT}") for i in nodes],
            modules=nginx_modules(nginx), js_dir=str(deploy / "nginx"), pid=str(pid_file),
            error_log=str(self.tmp / "nginx.error.log"),
            access_log=str(self.tmp / "nginx.access.log"), proxy_bind="")
        conf = conf_dir / "nginx.conf"
        conf.write_text(render_template((deploy / NGINX_TEMPLATE).read_text(), values))
        base = [nginx, "-p", str(conf_dir), "-c", str(conf), "-e",
                str(self.tmp / "nginx.error.log")]
        self.run(self.balancer, *base, "-t", "-q")
        self.nginx = self.spawn(self.balancer, [*base, "-g", "daemon off;"], "nginx",
                                stop_signal=signal.SIGTERM)  # fast shutdown, workers too
        deadline = time.monotonic() + 10
        while True:
            try:
                if int(pid_file.read_text().strip()) == self.nginx.pid:
                    break
            except (OSError, ValueError):
                pass
            assert self.nginx.alive(), f"nginx exited:\n{self.nginx.tail()}"
            assert time.monotonic() < deadline, f"nginx not up:\n{self.nginx.tail()}"
            time.sleep(0.05)
        self.wait_tcp(self.client, BALANCER, GW_PORT)

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(3)
            except Exception:
                p.kill()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    # ---- processes -------------------------------------------------------------------------

    def spawn(self, ns: str, argv: list[str], name: str,
              stop_signal: int | None = None) -> Proc:
        p = Proc(ns, argv, self.tmp / f"{name}.log", self.env, stop_signal)
        self.procs.append(p)
        return p

    def python(self, ns: str, module: str, *args: str, name: str) -> Proc:
        return self.spawn(ns, [sys.executable, "-m", module, *args], name)

    def run(self, ns: str, *argv: str, timeout: float = 20.0, check: bool = True) -> str:
        return sh("ip", "netns", "exec", ns, *argv, timeout=timeout, check=check)

    def wait_tcp(self, ns: str, host: str, port: int, timeout: float = 10.0) -> None:
        code = (f"import socket,time\nt=time.monotonic()+{timeout}\n"
                f"while True:\n try:\n  socket.create_connection(({host!r},{port}),1).close()\n"
                f"  break\n except OSError:\n  assert time.monotonic()<t\n  time.sleep(0.05)\n")
        self.run(ns, sys.executable, "-c", code, timeout=timeout + 5)

    def add_client(self, prefixes: str, rate: int = 600) -> tuple[bytes, bytes]:
        """A client key allowed ``prefixes``; ``rate``: reattaches per minute (the policy's
        default, 30, is a real client's; the lab's agents jump every second or so)."""
        priv, pub = generate_keypair()
        self.run(self.core, sys.executable, "-m", "jvpn.cli", "clients", "add", pub.hex(),
                 "--prefixes", prefixes, "--kek-file", str(self.tmp / "kek.key"),
                 "--store-url", self.store_url, "--ttl", "60", "--rate", str(rate))
        return priv, pub

    def start_gateway(self, i: int, keepalive: float = 0.2, quic: bool = False) -> Proc:
        ns = self.gws[i - 1]
        sets = {
            "node_id": f"gw-{i}", "listen_udp": f"{OUT_NET}.{i}:{GW_PORT}",
            "listen_quic": f"{OUT_NET}.{i}:{QUIC_PORT}" if quic else "",
            "listen_tcp": f"{OUT_NET}.{i}:{GW_PORT}", "admin": f"{OUT_NET}.{i}:9100",
            "keepalive_interval_s": keepalive, "inner_pool_v4": POOL_V4,
            "inner_pool_v6": POOL_V6, "egress": self.egress, "tun_name": "jvpn0",
            "events.redis_stream": "false", "handshake_retry_threshold": -1,
            "lease_s": 3.0, "quic_server_id": i,
        }
        if self.with_balancer:
            sets["trusted_balancers"] = BALANCER_BACK
        if self.egress == "routed":
            sets.update({"relay_listen": f"{IN_NET}.{i}:{RELAY_PORT}", "routed_vip": VIP,
                         "routed_vip6": VIP6,
                         "routed_vip_interface": "in0", "routed_lease_s": 0.6})
        args = ["--private-key-file", str(self.tmp / "gw.key"), "--kek-file",
                str(self.tmp / "kek.key"), "--store-url", self.store_url]
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        p = self.python(ns, "gateway.cli", *args, name=f"gw-{i}")
        self.gw_procs[i] = p
        return p

    def wait_gateways_ready(self, which: list[int], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for i in which:
            while True:
                out = self.run(self.gws[i - 1], "curl", "-s", "-m", "1",
                               f"http://{OUT_NET}.{i}:9100/readyz", check=False)
                if "ok" in out:
                    break
                p = self.gw_procs[i]
                assert p.alive(), f"gw-{i} exited:\n{p.tail()}"
                assert time.monotonic() < deadline, f"gw-{i} not ready:\n{p.tail()}"
                time.sleep(0.1)

    def metric(self, i: int, name: str, **labels: str) -> float:
        """One counter of gw-i's /metrics (0 if absent)."""
        text = self.run(self.gws[i - 1], "curl", "-s", "-m", "2",
                        f"http://{OUT_NET}.{i}:9100/metrics", check=False)
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def agent(self, priv: bytes, transports: tuple[str, ...] = ("udp", "tcp"),
              rekey_after: float = 120.0) -> Proc:
        """An L3 agent in the client namespace; its one gateway address is the balancer's
        (without one: every node's)."""
        hosts = [BALANCER] if self.with_balancer else [f"{OUT_NET}.{i}"
                                                       for i in range(1, self.n + 1)]
        cfg = {"private_key": priv.hex(), "gateway_public_key": self.gw_pub.hex(),
               "gateways": [f"{h}:{GW_PORT}" for h in hosts],
               "quic_gateways": [f"{h}:{QUIC_PORT}" for h in hosts] if "quic" in transports
               else [],
               "transports": list(transports), "tun": "jvpn0", "keepalive": 0.2,
               "rekey_after": rekey_after}
        return self.python(self.client, "instruments.l3agent", json.dumps(cfg), name="agent")

    def wait_agent(self, agent: Proc, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = agent.ask("status")
            if st.get("connected"):
                return st
            assert agent.alive() and time.monotonic() < deadline, f"agent not up:\n{agent.tail()}"
            time.sleep(0.1)

    def addresses(self, ns: str) -> Any:
        return json.loads(self.run(ns, "ip", "-j", "addr", "show"))
