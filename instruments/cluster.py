"""``jvpn-lab cluster up|down|status|restart|add-client``: a local cluster as processes on loopback.

Theory of operation. ``up`` starts, as detached child processes, a store (one
``redis-server``), N ``jvpn-gateway`` nodes sharing one static key and KEK,
the nginx balancer and optionally Prometheus, and waits (bounded) until each
answers: redis PING from our pid, each gateway's ``/readyz``, nginx's pid file
and TCP port, Prometheus ``/-/ready``. The configs are the ones the containers
use (docs/ARCHITECTURE.md, Deploy), rendered, not copied: ``deploy/gateway.toml`` is each
gateway's ``--config`` (flags override addresses, store and keys);
``deploy/nginx/nginx.conf.template`` is filled with the same ``${JVPN_*}``
placeholders the nginx image's envsubst fills from docker-compose.yml, and its
``js_path`` is ``deploy/nginx`` itself, so ``jvpn.js`` is the very file;
``deploy/prometheus/prometheus.yml`` gets its marked service-discovery block
swapped for a ``file_sd_configs`` (DNS in compose, a targets file here).

Everything lives in the run directory (default ``.jvpn/cluster``): keys
(reused by the next ``up``, so pinned clients stay valid), rendered configs,
logs, data, and ``cluster.json`` with the addresses, the gateway public key and
every process started (pid and kernel start time). ``down`` signals only those
pids, and the children nginx forked from its recorded master, after checking
the start time (a recycled pid is never signalled). ``restart NODE`` stops one
recorded gateway the same way and starts it again with its recorded argv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from store.embedded import free_port  # one picker for every local server's port

DEFAULT_RUN_DIR = ".jvpn/cluster"
STATE_FILE = "cluster.json"
ENV_FILE = "cluster.env"
STATE_VERSION = 1
DEFAULT_GATEWAYS = 3
DEFAULT_PORT = 51820
STARTUP_TIMEOUT_S = 20.0
CLUSTER_NODES = 6  # --redis-cluster: 3 masters, 3 replicas
STOP_TIMEOUT_S = 5.0
UDP_IDLE_TIMEOUT = "30s"  # nginx proxy_timeout of a UDP flow (same as docker-compose.yml)
# nginx's source address toward the gateways (proxy_bind): deploy/gateway.toml trusts it
# as the balancer, so what else talks to a gateway from 127.0.0.1 is an ordinary client.
BALANCER_SOURCE = "127.0.0.254"
TCP_IDLE_TIMEOUT = "10m"
DEPLOY_DIR_ENV = "JVPN_DEPLOY_DIR"

NGINX_TEMPLATE = "nginx/nginx.conf.template"
NGINX_JS = "nginx/jvpn.js"
PROMETHEUS_CONFIG = "prometheus/prometheus.yml"
PROMETHEUS_RULES = "prometheus/rules"
GATEWAY_CONFIG = "gateway.toml"

PLACEHOLDER = re.compile(r"\$\{(JVPN_[A-Z0-9_]+)\}")
SD_BEGIN = "# >>> jvpn-sd"
SD_END = "# <<< jvpn-sd"
MARKED = re.compile(r"^(?P<head>\s*(?:-\s+|[A-Za-z_]+:\s+))(?P<value>\S.*?)(?P<tail>\s+# jvpn: (?P<name>[a-z_]+))\s*$")
DURATION = re.compile(r"^\d+(ms|s|m|h)$")
NGINX_MODULE_DIRS = (
    "/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules",
    "/etc/nginx/modules", "/usr/local/nginx/modules",
)  # fmt: skip
INSTALL = {
    "redis-server": "apt-get install redis-server",
    "redis-cli": "apt-get install redis-tools",
    "nginx": "apt-get install nginx libnginx-mod-stream libnginx-mod-stream-js",
    "prometheus": "apt-get install prometheus",
}


class ClusterError(Exception):
    """A cluster command failed; the message says what, where to look and what to do."""


# ---- rendering the deploy/ configs (pure: text in, text out) -------------------------------


def default_deploy_dir() -> Path:
    """``$JVPN_DEPLOY_DIR``, else the ``deploy/`` folder of this checkout."""
    env = os.environ.get(DEPLOY_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "deploy"


def template_placeholders(text: str) -> set[str]:
    """The ``${JVPN_*}`` names a template uses."""
    return set(PLACEHOLDER.findall(text))


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Fill every ``${JVPN_*}`` (as envsubst does in the nginx image); a missing one is an error."""
    missing = sorted(template_placeholders(text) - values.keys())
    if missing:
        raise ClusterError(f"template placeholders without a value: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def nginx_values(
    *, listen: str, udp_servers: Sequence[str], tcp_servers: Sequence[str], modules: str,
    js_dir: str, pid: str, error_log: str, access_log: str, workers: str = "1",
    quic_listen: str, quic_servers: Sequence[str], quic_nodes: Sequence[tuple[int, str]],
    resolver: str = "", udp_idle: str = UDP_IDLE_TIMEOUT, tcp_idle: str = TCP_IDLE_TIMEOUT,
    proxy_bind: str = BALANCER_SOURCE,
) -> dict[str, str]:
    """The placeholder values of the nginx template for a local run (compose sets its own)."""
    def servers(addrs: Sequence[str]) -> str:
        return "\n        ".join(f"server {a};" for a in addrs)

    return {
        "JVPN_NGINX_MODULES": modules, "JVPN_NGINX_WORKERS": workers, "JVPN_NGINX_PID": pid,
        "JVPN_NGINX_ERROR_LOG": error_log, "JVPN_NGINX_ACCESS_LOG": access_log,
        "JVPN_NGINX_JS_DIR": js_dir, "JVPN_NGINX_RESOLVER": resolver, "JVPN_LISTEN": listen,
        "JVPN_UDP_SERVERS": servers(udp_servers), "JVPN_TCP_SERVERS": servers(tcp_servers),
        # the same lists for jvpn.js's route hints ($jvpn_nodes): same names, same order
        "JVPN_UDP_NODES": " ".join(udp_servers), "JVPN_TCP_NODES": " ".join(tcp_servers),
        "JVPN_UDP_IDLE_TIMEOUT": udp_idle, "JVPN_TCP_IDLE_TIMEOUT": tcp_idle,
        "JVPN_NGINX_PROXY_BIND": f"proxy_bind {proxy_bind};" if proxy_bind else "",
        "JVPN_QUIC_LISTEN": quic_listen, "JVPN_QUIC_SERVERS": servers(quic_servers),
        "JVPN_QUIC_NODES": ",".join(f"{sid}={addr}" for sid, addr in quic_nodes),
    }  # fmt: skip


def render_prometheus(
    text: str, *, targets_file: str, rules_dir: str, interval: str | None = None
) -> str:
    """deploy/prometheus/prometheus.yml for local processes: file_sd instead of DNS SD.

    Only what the file marks changes: the block between ``# >>> jvpn-sd`` and
    ``# <<< jvpn-sd``, and the values of lines ending in ``# jvpn: <name>``
    (``scrape_interval``, ``evaluation_interval`` when ``interval`` is given,
    ``rule_files``). Every marker must be present exactly once.
    """
    if interval is not None and not DURATION.match(interval):
        raise ClusterError(f"bad interval {interval!r}: expected e.g. 500ms, 1s, 5s, 1m")
    lines = text.splitlines()
    begins = [i for i, line in enumerate(lines) if line.strip() == SD_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == SD_END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ClusterError(f"prometheus config: expected one '{SD_BEGIN}' ... '{SD_END}' block")
    b, e = begins[0], ends[0]
    ind = lines[b][: len(lines[b]) - len(lines[b].lstrip())]
    sd = [
        f"{ind}file_sd_configs:",
        f"{ind}  - files: [{json.dumps(targets_file)}]",
        f"{ind}    refresh_interval: 5s",
    ]
    lines = lines[: b + 1] + sd + lines[e:]
    wanted = {"rule_files": json.dumps(str(Path(rules_dir) / "*.yml"))}
    if interval is not None:
        wanted["scrape_interval"] = wanted["evaluation_interval"] = interval
    seen: dict[str, int] = {}
    out = []
    for line in lines:
        m = MARKED.match(line)
        if m:
            name = m.group("name")
            seen[name] = seen.get(name, 0) + 1
            if name in wanted:
                line = f"{m.group('head')}{wanted[name]}{m.group('tail')}"
        out.append(line)
    for name in ("scrape_interval", "evaluation_interval", "rule_files"):
        if seen.get(name) != 1:
            raise ClusterError(f"prometheus config: expected one line marked '# jvpn: {name}'")
    return "\n".join(out) + "\n"


def prometheus_targets(gateways: Sequence[GatewayInfo]) -> list[dict[str, Any]]:
    """The file_sd targets: one per gateway admin address, labelled with its node id."""
    return [{"targets": [g.admin], "labels": {"node": g.node_id, "deployment": "local"}}
            for g in gateways]


# ---- process bookkeeping --------------------------------------------------------------------


@dataclass
class Proc:
    """One process ``up`` started: enough to find it again, and only it."""

    name: str
    role: str  # store | gateway | balancer | prometheus
    pid: int
    start_ticks: int | None  # /proc/<pid>/stat field 22: tells a recycled pid apart
    argv: list[str]
    log: str


@dataclass
class GatewayInfo:
    node_id: str
    udp: str
    tcp: str
    admin: str
    pid: int = 0
    quic: str = ""  # its QUIC listener
    quic_server_id: int = 0  # in its QUIC connection IDs (the balancer routes by it)


@dataclass
class ClusterState:
    """cluster.json."""

    run_dir: str
    deploy_dir: str
    store_url: str = ""
    store_kind: str = ""  # redis-server | external
    gateway_public_key: str = ""
    balancer: dict[str, str] = field(default_factory=dict)  # udp, tcp
    gateways: list[GatewayInfo] = field(default_factory=list)
    prometheus: dict[str, str] = field(default_factory=dict)  # url
    processes: list[Proc] = field(default_factory=list)
    started_at: float = 0.0
    version: int = STATE_VERSION

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, run_dir: Path) -> ClusterState:
        path = run_dir / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster state at {path}: was `jvpn-lab cluster up` run "
                               f"with this --run-dir?") from None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read {path}: {exc}") from None
        if raw.get("version") != STATE_VERSION:
            raise ClusterError(f"{path}: unknown state version {raw.get('version')!r}")
        raw["gateways"] = [GatewayInfo(**g) for g in raw.get("gateways", [])]
        raw["processes"] = [Proc(**p) for p in raw.get("processes", [])]
        return cls(**raw)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of ``pid`` from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fp:
            data = fp.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    rest = data.rpartition(")")[2].split()  # fields 3.. (the command may contain spaces)
    return rest[0], int(rest[1]), int(rest[19])


def start_ticks(pid: int) -> int | None:
    """The kernel start time of ``pid`` (None where /proc is not available)."""
    try:
        st = _stat(pid)
    except OSError:
        return None
    return st[2] if st else None


def is_alive(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` runs and is the process that had start time ``ticks`` (zombies are dead)."""
    try:
        st = _stat(pid)
    except OSError:  # no /proc: signal 0 is the best we can do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if st is None or st[0] in ("Z", "X"):
        return False
    return ticks is None or st[2] == ticks


def _children(pid: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of the live children of ``pid`` (e.g. nginx workers)."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    st = _stat(int(entry))
                    if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                        out.append((int(entry), st[2]))
    return out


def stop_process(proc: Proc, timeout: float = STOP_TIMEOUT_S,
                 reap: Callable[[], None] | None = None) -> str:
    """SIGTERM ``proc`` (only if it is still the process we started), SIGKILL if it lingers."""
    if not is_alive(proc.pid, proc.start_ticks):
        return "not running"
    children = _children(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)  # nginx: fast shutdown (SIGQUIT would wait for UDP flows)
    how = "stopped"
    if not _wait_dead(proc.pid, proc.start_ticks, timeout, reap):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        _wait_dead(proc.pid, proc.start_ticks, 2.0, reap)
        how = f"killed (no exit {timeout:.0f} s after SIGTERM)"
    for cpid, cticks in children:  # a worker outliving its master: ours to end too
        if not _wait_dead(cpid, cticks, 2.0, None):
            with contextlib.suppress(ProcessLookupError):
                os.kill(cpid, signal.SIGKILL)
            _wait_dead(cpid, cticks, 2.0, None)
    return how


def _wait_dead(pid: int, ticks: int | None, timeout: float,
               reap: Callable[[], None] | None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap()
        if not is_alive(pid, ticks):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fp:
            data = fp.read()[-16384:]
    except OSError:
        return "(no log)"
    text = b"\n".join(data.splitlines()[-lines:]).decode("utf-8", "replace")
    return "    " + text.replace("\n", "\n    ") if text else "(empty log)"


# ---- small network helpers ------------------------------------------------------------------


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return 0, ""


def _pid_answers(host: str, port: int, pid: int,
                 server_pid: Callable[[str, int, float], int | None]) -> Callable[[], bool]:
    return lambda: server_pid(host, port, 0.2) == pid


def _check_gateway_store_url(url: str) -> None:
    """Fail before starting anything if jvpn-gateway would refuse this store URL."""
    from gateway.config import load_gateway_config
    from settings import ConfigError

    try:
        load_gateway_config(None, env={}, overrides={"store_url": url})
    except ConfigError as exc:
        scheme = url.split("://", 1)[0]
        raise ClusterError(f"jvpn-gateway does not accept a {scheme}:// store URL ({exc}); "
                           "the gateway config must allow it first") from None


def _answers_200(url: str) -> Callable[[], bool]:
    return lambda: http_get(url)[0] == 200


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _ping_store(url: str, timeout: float) -> None:
    """PING the store at ``url`` (auth and TLS as the URL says); a clear error if it won't."""
    from store.api import SessionStore, StoreConfig

    async def ping() -> bool:
        store = SessionStore.from_url(url, StoreConfig(socket_timeout_s=min(timeout, 5.0),
                                                       connect_timeout_s=min(timeout, 5.0)))
        try:
            return await store.ping()
        finally:
            await store.close()

    try:
        ok = asyncio.run(ping())
    except Exception as exc:  # any client error: say which store and why
        raise ClusterError(f"--store-url {url}: {type(exc).__name__}: {exc}") from None
    if not ok:
        raise ClusterError(f"--store-url {url}: no PING answer")


def find_binary(name: str, *extra: str) -> str:
    for path in (shutil.which(name), *extra, f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise ClusterError(f"{name} not found: {INSTALL.get(name, 'install it')} (or `make deps`)")


def nginx_modules(nginx: str) -> str:
    """``load_module`` lines for the stream and njs stream modules of this nginx build."""
    info = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    m = re.search(r"--modules-path=(\S+)", info)
    dirs = ([m.group(1)] if m else []) + list(NGINX_MODULE_DIRS)
    needed = ["ngx_stream_js_module.so"]
    if "--with-stream=dynamic" in info:
        needed.insert(0, "ngx_stream_module.so")
    elif "--with-stream" not in info:
        raise ClusterError(f"{nginx} is built without the stream module: {INSTALL['nginx']}")
    lines = []
    for mod in needed:
        found = next((os.path.join(d, mod) for d in dirs if os.path.isfile(os.path.join(d, mod))),
                     None)
        if found is None:
            pkg = "libnginx-mod-stream-js" if "js" in mod else "libnginx-mod-stream"
            raise ClusterError(f"nginx module {mod} not found in {', '.join(dirs)}: "
                               f"apt-get install {pkg}")
        lines.append(f"load_module {found};")
    return "\n".join(lines)


def gateway_command() -> list[str]:
    """``jvpn-gateway`` beside this interpreter, else ``python -m gateway.cli``."""
    script = Path(sys.executable).parent / "jvpn-gateway"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fp:
        fp.write(text + "\n")


# ---- up -------------------------------------------------------------------------------------


@dataclass
class UpOptions:
    run_dir: Path
    deploy_dir: Path
    gateways: int = DEFAULT_GATEWAYS
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    store_url: str = ""
    redis_cluster: bool = False
    prometheus: bool = False
    prometheus_port: int = 0
    scrape_interval: str | None = None
    gateway_sets: list[str] = field(default_factory=list)
    nginx_workers: int = 1
    timeout: float = STARTUP_TIMEOUT_S


class Launcher:
    """Brings a cluster up step by step; on any failure stops what it started."""

    def __init__(self, opts: UpOptions) -> None:
        self.o = opts
        self.run = opts.run_dir.resolve()
        self.deploy = opts.deploy_dir.resolve()
        self.logs = self.run / "logs"
        self.state = ClusterState(run_dir=str(self.run), deploy_dir=str(self.deploy),
                                  started_at=time.time())
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self.nginx = self.nginx_load = self.redis = self.redis_cli = self.prom = ""

    # -- orchestration --

    def up(self) -> ClusterState:
        self._preflight()
        try:
            self._start_store()
            self._start_gateways()
            self._start_nginx()
            if self.o.prometheus:
                self._start_prometheus()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, ClusterError):
                raise ClusterError(f"{exc}\n(stopped what had started; logs in {self.logs})") from None
            raise
        self._write_env()
        self.state.save()
        return self.state

    def _preflight(self) -> None:
        o = self.o
        if o.gateways < 1:
            raise ClusterError("--gateways must be at least 1")
        for rel in (GATEWAY_CONFIG, NGINX_TEMPLATE, NGINX_JS, PROMETHEUS_CONFIG):
            if not (self.deploy / rel).is_file():
                raise ClusterError(f"{self.deploy / rel} missing: run from a checkout or set "
                                   f"--deploy-dir / ${DEPLOY_DIR_ENV}")
        for item in o.gateway_sets:
            if "=" not in item:
                raise ClusterError(f"--set {item!r}: expected KEY=VALUE")
        if (self.run / STATE_FILE).exists():
            try:
                old: ClusterState | None = ClusterState.load(self.run)
            except ClusterError:
                old = None  # unreadable leftovers: nothing we can stop, start afresh
            live = [p for p in old.processes if is_alive(p.pid, p.start_ticks)] if old else []
            if live:
                names = ", ".join(f"{p.name} (pid {p.pid})" for p in live)
                raise ClusterError(f"a cluster is already running in {self.run}: {names}; "
                                   f"run `jvpn-lab cluster down --run-dir {self.run}` first")
        # Binaries first, so a missing one fails before anything starts.
        self.nginx = find_binary("nginx")
        self.nginx_load = nginx_modules(self.nginx)
        self.redis = "" if o.store_url else find_binary("redis-server")
        if o.redis_cluster:
            self.redis_cli = find_binary("redis-cli")
            _check_gateway_store_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
        elif o.store_url:
            _check_gateway_store_url(o.store_url)
        self.prom = find_binary("prometheus") if o.prometheus else ""
        for d in (self.run, self.logs, self.run / "keys", self.run / "nginx"):
            d.mkdir(parents=True, exist_ok=True)
        self.state.save()

    def _abort(self) -> None:
        for proc in reversed(self.state.processes):
            stop_process(proc, 3.0, self._reap)
        self._reap()
        self.state.save()

    def _reap(self) -> None:
        for p in list(self._popen.values()):
            p.poll()

    def _spawn(self, name: str, role: str, argv: list[str], cwd: Path | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as fp:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fp, stderr=subprocess.STDOUT,
                                 cwd=str(cwd or self.run), close_fds=True, start_new_session=True)
        self._popen[p.pid] = p
        proc = Proc(name, role, p.pid, start_ticks(p.pid), argv, str(log))
        self.state.processes.append(proc)
        self.state.save()
        return proc

    def _wait_ready(self, proc: Proc, what: str, check: Callable[[], bool],
                    deadline: float) -> None:
        while True:
            self._reap()
            if not is_alive(proc.pid, proc.start_ticks):
                raise ClusterError(f"{what} (pid {proc.pid}) exited during startup; "
                                   f"{proc.log}:\n{log_tail(proc.log)}")
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} (pid {proc.pid}) not ready after {self.o.timeout:.0f} s; "
                                   f"{proc.log}:\n{log_tail(proc.log)}")
            time.sleep(0.05)

    # -- components --

    def _start_store(self) -> None:
        o = self.o
        if o.redis_cluster:
            self._start_redis_cluster()
            return
        if o.store_url:
            _ping_store(o.store_url, o.timeout)
            self.state.store_url, self.state.store_kind = o.store_url, "external"
            return
        from store.embedded import server_pid

        data = self.run / "redis"
        data.mkdir(exist_ok=True)
        port = free_port(o.host)
        argv = [self.redis, "--port", str(port), "--bind", o.host, "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
                "--daemonize", "no", "--logfile", ""]  # fmt: skip
        proc = self._spawn("redis", "store", argv, cwd=data)
        self._wait_ready(proc, "redis-server", lambda: server_pid(o.host, port, 0.2) == proc.pid,
                         time.monotonic() + o.timeout)
        self.state.store_url = f"redis://{o.host}:{port}/0"
        self.state.store_kind = "redis-server"

    def _start_redis_cluster(self) -> None:
        """Six cluster-enabled redis-server nodes (3 masters, 3 replicas), joined by redis-cli.

        Throwaway by design: no persistence and a fresh directory each `up` (the nodes'
        cluster config files name their ports, which are new every time).
        """
        import redis

        o = self.o
        data = self.run / "redis-cluster"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        deadline = time.monotonic() + o.timeout
        nodes: list[tuple[Proc, int]] = []
        taken: set[int] = set()
        for i in range(1, CLUSTER_NODES + 1):
            port, bus = free_port(o.host), free_port(o.host)
            while port in taken or bus in taken or port == bus:
                port, bus = free_port(o.host), free_port(o.host)
            taken |= {port, bus}
            argv = [self.redis, "--port", str(port), "--bind", o.host, "--save", "",
                    "--appendonly", "no", "--dir", str(data), "--daemonize", "no",
                    "--logfile", "", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(data / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "2000", "--cluster-port", str(bus),
                    # no 5 s wait for more replicas before the first full sync
                    "--repl-diskless-sync-delay", "0"]  # fmt: skip
            nodes.append((self._spawn(f"redis-{i}", "store", argv, cwd=data), port))
        from store.embedded import server_pid

        for proc, port in nodes:
            self._wait_ready(proc, f"redis-server {proc.name}",
                             _pid_answers(o.host, port, proc.pid, server_pid), deadline)
        addrs = [f"{o.host}:{port}" for _, port in nodes]
        create = subprocess.run(
            [self.redis_cli, "--cluster", "create", *addrs, "--cluster-replicas", "1",
             "--cluster-yes"], capture_output=True, text=True, timeout=o.timeout,
            stdin=subprocess.DEVNULL)  # fmt: skip
        if create.returncode != 0 or "All 16384 slots covered" not in create.stdout:
            raise ClusterError(f"redis-cli --cluster create failed:\n"
                               f"{(create.stdout + create.stderr)[-2000:]}")

        def cluster_ok() -> bool:
            # Up means failover-ready: cluster_state:ok everywhere, and every master has a
            # replica that finished its first full sync. A replica still waiting for that
            # sync can be promoted empty by a master death: every session of the shard gone.
            synced_masters = 0
            for _, port in nodes:
                client = redis.Redis(host=o.host, port=port, socket_timeout=1.0,
                                     socket_connect_timeout=1.0)
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                    repl = client.info("replication")
                except redis.RedisError:
                    return False
                finally:
                    client.close()
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                if repl.get("role") == "slave":
                    if repl.get("master_link_status") != "up" or repl.get("master_sync_in_progress"):
                        return False
                elif any(isinstance(v, dict) and v.get("state") == "online"
                         for k, v in repl.items() if k.startswith("slave")):
                    synced_masters += 1
            return synced_masters == CLUSTER_NODES // 2

        self._wait_ready(nodes[0][0], "redis cluster (cluster_state:ok on every node, every "
                         "master with a synced replica)", cluster_ok, deadline)
        self.state.store_url = "redis+cluster://" + ",".join(addrs)
        self.state.store_kind = "redis-cluster"

    def _keys(self) -> tuple[Path, Path]:
        from session.noise import generate_keypair, public_key

        key_dir = self.run / "keys"
        key, kek = key_dir / "gateway.key", key_dir / "kek.key"
        if not key.exists():
            priv, _ = generate_keypair()
            _write_secret(key, priv.hex())
        if not kek.exists():
            _write_secret(kek, os.urandom(32).hex())
        from settings import decode_key

        self.state.gateway_public_key = public_key(decode_key(key.read_text().strip())).hex()
        return key, kek

    def _start_gateways(self) -> None:
        o = self.o
        key, kek = self._keys()
        base = gateway_command()
        started: list[tuple[Proc, GatewayInfo]] = []
        for i in range(1, o.gateways + 1):
            node = f"gw-{i}"
            port = free_port(o.host, udp_too=True)
            admin = free_port(o.host)
            quic = free_port(o.host, udp_too=True)
            info = GatewayInfo(node, f"{o.host}:{port}", f"{o.host}:{port}", f"{o.host}:{admin}",
                               quic=f"{o.host}:{quic}", quic_server_id=i)
            argv = [*base, "--config", str(self.deploy / GATEWAY_CONFIG), "--node-id", node,
                    "--listen-udp", info.udp, "--listen-tcp", info.tcp, "--admin", info.admin,
                    "--set", f"listen_quic={info.quic}", "--set", f"quic_server_id={i}",
                    "--store-url", self.state.store_url, "--private-key-file", str(key),
                    "--kek-file", str(kek), "--set", "events.stdout=false",
                    "--set", f"events.file={self.logs / f'{node}.events.jsonl'}"]  # fmt: skip
            for item in o.gateway_sets:
                argv += ["--set", item]
            proc = self._spawn(node, "gateway", argv)
            info.pid = proc.pid
            self.state.gateways.append(info)
            started.append((proc, info))
        self.state.save()
        deadline = time.monotonic() + o.timeout
        for proc, info in started:
            url = f"http://{info.admin}/readyz"
            self._wait_ready(proc, f"gateway {info.node_id}", _answers_200(url), deadline)

    def _start_nginx(self) -> None:
        o = self.o
        port = o.port or free_port(o.host, udp_too=True)
        listen = f"{o.host}:{port}"
        quic_listen = f"{o.host}:{free_port(o.host, udp_too=True)}"
        conf_dir = self.run / "nginx"
        pid_file = conf_dir / "nginx.pid"
        values = nginx_values(
            listen=listen, udp_servers=[g.udp for g in self.state.gateways],
            tcp_servers=[g.tcp for g in self.state.gateways], modules=self.nginx_load,
            quic_listen=quic_listen, quic_servers=[g.quic for g in self.state.gateways],
            quic_nodes=[(g.quic_server_id, g.quic) for g in self.state.gateways],
            js_dir=str(self.deploy / "nginx"), pid=str(pid_file),
            error_log=str(self.logs / "nginx.error.log"),
            access_log=str(self.logs / "nginx.access.log"), workers=str(o.nginx_workers))
        template = (self.deploy / NGINX_TEMPLATE).read_text()
        conf = conf_dir / "nginx.conf"
        conf.write_text(render_template(template, values))
        base = [self.nginx, "-p", str(conf_dir), "-c", str(conf), "-e",
                str(self.logs / "nginx.error.log")]
        test = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise ClusterError(f"nginx rejects the rendered {conf}:\n{test.stderr.strip()}")
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        proc = self._spawn("nginx", "balancer", [*base, "-g", "daemon off;"])

        def ready() -> bool:
            try:
                ok = int(pid_file.read_text().strip()) == proc.pid
            except (OSError, ValueError):
                return False
            return ok and tcp_accepts(o.host, port)

        self._wait_ready(proc, "nginx", ready, time.monotonic() + o.timeout)
        self.state.balancer = {"udp": listen, "tcp": listen, "quic": quic_listen}

    def _start_prometheus(self) -> None:
        o = self.o
        prom_dir = self.run / "prometheus"
        (prom_dir / "data").mkdir(parents=True, exist_ok=True)
        targets = prom_dir / "targets.json"
        targets.write_text(json.dumps(prometheus_targets(self.state.gateways), indent=2) + "\n")
        config = prom_dir / "prometheus.yml"
        config.write_text(render_prometheus(
            (self.deploy / PROMETHEUS_CONFIG).read_text(), targets_file=str(targets),
            rules_dir=str(self.deploy / PROMETHEUS_RULES), interval=o.scrape_interval))
        port = o.prometheus_port or free_port(o.host)
        listen = f"{o.host}:{port}"
        argv = [self.prom, f"--config.file={config}", f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address={listen}", "--storage.tsdb.retention.time=1d"]
        proc = self._spawn("prometheus", "prometheus", argv, cwd=prom_dir)
        url = f"http://{listen}"
        self._wait_ready(proc, "prometheus", lambda: http_get(f"{url}/-/ready")[0] == 200,
                         time.monotonic() + o.timeout)
        self.state.prometheus = {"url": url, "config": str(config), "targets": str(targets)}

    def _write_env(self) -> None:
        s = self.state
        lines = [
            "# . this file: `jvpn clients ...` and `jvpn sessions ...` then use this cluster's store",
            f"export JVPN_STORE_URL={s.store_url}",
            f"export JVPN_GATEWAY_PUBLIC_KEY={s.gateway_public_key}",
            f"export JVPN_CLUSTER_UDP={s.balancer.get('udp', '')}",
            f"export JVPN_CLUSTER_TCP={s.balancer.get('tcp', '')}",
            f"export JVPN_CLUSTER_QUIC={s.balancer.get('quic', '')}",
        ]
        (self.run / ENV_FILE).write_text("\n".join(lines) + "\n")


def summary(state: ClusterState) -> str:
    run = state.run_dir
    b = state.balancer
    nginx_pid = next((p.pid for p in state.processes if p.role == "balancer"), 0)
    out = [f"cluster up: {len(state.gateways)} gateways behind nginx, store {state.store_url} "
           f"(run dir {run})",
           f"  balancer    udp {b['udp']}  tcp {b['tcp']}  quic {b.get('quic', '-')}  "
           f"(nginx pid {nginx_pid})"]
    for g in state.gateways:
        out.append(f"  {g.node_id:<10}  udp {g.udp}  quic {g.quic or '-'}  "
                   f"admin http://{g.admin}/metrics  (pid {g.pid})")
    if state.prometheus:
        out.append(f"  prometheus  {state.prometheus['url']}")
    out += [
        f"  gateway public key  {state.gateway_public_key}",
        "",
        "Register a client, then run an agent through the balancer:",
        f"  jvpn-lab cluster add-client --run-dir {run} --name alice --upstream 127.0.0.1:9000",
        "  (generates the client key and prints the jvpn-agent command), or by hand:",
        "  jvpn keys gen --out alice.key",
        f"  jvpn clients add <alice public key> --upstream 127.0.0.1:9000 --store-url {state.store_url}",
        f"  jvpn-agent --private-key-file alice.key --gateway-public-key {state.gateway_public_key} \\",
        f"      --gateway {b['udp']} --tcp-gateway {b['tcp']} --quic-gateway {b.get('quic', '?')} "
        "--upstream 127.0.0.1:9000 --local-udp 127.0.0.1:5555",
        f"Status: jvpn-lab cluster status --run-dir {run}    stop: jvpn-lab cluster down --run-dir {run}",
    ]
    return "\n".join(out)


# ---- status / down --------------------------------------------------------------------------


def check_status(state: ClusterState) -> list[dict[str, Any]]:
    """One row per recorded process: alive or dead, and whether it answers."""
    from store.embedded import ping

    rows = []
    gateways = {g.pid: g for g in state.gateways}
    for p in state.processes:
        alive = is_alive(p.pid, p.start_ticks)
        ready, detail = False, "dead"
        if alive:
            if p.role == "store":
                host = p.argv[p.argv.index("--bind") + 1] if "--bind" in p.argv else "127.0.0.1"
                port = int(p.argv[p.argv.index("--port") + 1]) if "--port" in p.argv else 6379
                ready = ping(host, port)
                detail = "PING ok" if ready else "no PING answer"
            elif p.role == "gateway" and p.pid in gateways:
                status, body = http_get(f"http://{gateways[p.pid].admin}/readyz", timeout=3.0)
                ready = status == 200
                reason = ""
                with contextlib.suppress(ValueError, AttributeError):
                    reason = json.loads(body).get("reason", "")
                detail = (f"/readyz {status}" if status else "/readyz: no answer") + (
                    f" ({reason})" if reason else "")
            elif p.role == "balancer" and state.balancer:
                host, port = _hostport(state.balancer["tcp"])
                ready = tcp_accepts(host, port)
                detail = f"{'accepting' if ready else 'not accepting'} on {state.balancer['tcp']}"
            elif p.role == "prometheus" and state.prometheus:
                url = state.prometheus["url"]
                ready = http_get(f"{url}/-/ready")[0] == 200
                detail = "ready" if ready else "not ready"
                if ready:
                    status, body = http_get(f"{url}/api/v1/targets?state=active")
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        active = json.loads(body)["data"]["activeTargets"]
                        up = sum(1 for t in active if t.get("health") == "up")
                        detail += f", {up}/{len(active)} targets up"
            else:
                ready, detail = True, "alive"
        rows.append({"name": p.name, "role": p.role, "pid": p.pid, "alive": alive,
                     "ready": ready, "detail": detail})
    return rows


def down(run_dir: Path, timeout: float = STOP_TIMEOUT_S) -> list[tuple[Proc, str]]:
    """Stop every recorded process, newest first; the state file stays (for logs and keys)."""
    state = ClusterState.load(run_dir)
    results = [(p, stop_process(p, timeout)) for p in reversed(state.processes)]
    return results


def reload_balancer(state: ClusterState, timeout: float = 5.0) -> str:
    """Reload nginx (SIGHUP to the master ``up`` recorded) and wait for its new workers;
    raise ClusterError, saying why, if it was not reloaded. Returns what was done.

    Why after a gateway restart: nginx OSS's passive health check marks a server
    failed when a send to it fails (the restarting gateway's ICMP port unreachable)
    and clears the mark only when a flow to it *ends*, which a live session's UDP
    flow never does. Without a reload, a rolling restart demotes each restarted
    node in turn until no UDP upstream is left (measured: 1.4 s interruptions, the
    agents falling back to TCP). New workers start with fresh upstream state, and
    the flows they open are keyed by session id as before: each session reaches
    its hash node again (NOT_BOUND_HERE, then a reattach, where it had moved) and
    every other one rebinds to the new worker's address (nat_rebind).

    The configuration is tested first (``nginx -t``, the recorded command line):
    nginx would keep its old workers on a bad one, and we would not know why.
    """
    proc = next((p for p in state.processes if p.role == "balancer"), None)
    if proc is None or not is_alive(proc.pid, proc.start_ticks):
        raise ClusterError("no balancer running (the nginx `up` recorded is gone)")
    test = subprocess.run([*proc.argv, "-t"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, cwd=state.run_dir)
    if test.returncode != 0:
        raise ClusterError(f"nginx -t failed, nginx left as it was:\n{test.stderr.strip()}")
    if not reload_nginx(proc.pid, proc.start_ticks, timeout):
        log = Path(state.run_dir) / "logs" / "nginx.error.log"
        raise ClusterError(f"nginx (pid {proc.pid}) did not start its new workers "
                           f"{timeout:.0f} s after SIGHUP; {log}:\n{log_tail(log)}")
    return f"nginx (pid {proc.pid}) reloaded: fresh upstream health"


def reload_nginx(pid: int, ticks: int | None, timeout: float = 5.0) -> bool:
    """SIGHUP the nginx master ``pid`` (only if it is still that process); whether a new
    worker was up within ``timeout``: the master forks the new workers only once it has
    read the new configuration, and retires the old ones after. (Its children may
    include old workers of an earlier reload still finishing their flows, so the
    count of children says nothing more.)"""
    if not is_alive(pid, ticks):
        return False
    before = set(_children(pid))
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while not set(_children(pid)) - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def restart_gateway(run_dir: Path, node: str, timeout: float = STARTUP_TIMEOUT_S,
                    stop_timeout: float = STOP_TIMEOUT_S) -> tuple[Proc, int, str]:
    """Stop gateway ``node`` (only the process ``up`` recorded), start it again with the same
    argv (same ports, keys, log) and wait for its /readyz; the rest keeps running.
    (``jvpn-lab cluster restart`` then reloads the balancer: see ``reload_balancer``.)

    Returns (the new process, the old pid, how the old one stopped).
    """
    state = ClusterState.load(run_dir)
    proc = next((p for p in state.processes if p.role == "gateway" and p.name == node), None)
    info = next((g for g in state.gateways if g.node_id == node), None)
    if proc is None or info is None:
        names = ", ".join(g.node_id for g in state.gateways) or "none"
        raise ClusterError(f"no gateway {node!r} in {Path(state.run_dir) / STATE_FILE} "
                           f"(gateways: {names})")
    old_pid = proc.pid
    how = stop_process(proc, stop_timeout)
    with open(proc.log, "ab") as fp:
        p = subprocess.Popen(proc.argv, stdin=subprocess.DEVNULL, stdout=fp,
                             stderr=subprocess.STDOUT, cwd=state.run_dir, close_fds=True,
                             start_new_session=True)
    proc.pid, proc.start_ticks = p.pid, start_ticks(p.pid)
    info.pid = p.pid
    state.save()
    ready = _answers_200(f"http://{info.admin}/readyz")
    deadline = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            raise ClusterError(f"gateway {node} (pid {p.pid}) exited during restart; "
                               f"{proc.log}:\n{log_tail(proc.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"gateway {node} (pid {p.pid}) not ready {timeout:.0f} s after "
                               f"restart; {proc.log}:\n{log_tail(proc.log)}")
        time.sleep(0.05)
    return proc, old_pid, how


# ---- add-client -----------------------------------------------------------------------------


async def _register(store_url: str, kek: bytes, public: bytes, upstreams: Sequence[str],
                    name: str, ttl: float, rate: int, transports: Sequence[str],
                    max_age: float | None = None) -> None:
    from session.keys import registry_key
    from store.api import SessionStore, StoreConfig
    from store.policy import ClientPolicy

    store = SessionStore.from_url(store_url, StoreConfig(socket_timeout_s=5.0,
                                                         connect_timeout_s=5.0),
                                  registry_key=registry_key(kek))  # entries are MAC'd
    try:
        policy = ClientPolicy(public, name=name, ttl_s=ttl, reattach_rate=rate,
                              transports=tuple(transports), upstreams=tuple(upstreams))
        if max_age is not None:
            policy = replace(policy, max_age_s=max_age)
        await store.add_client(policy)
    finally:
        await store.close()


# ---- CLI ------------------------------------------------------------------------------------


def add_cluster_parser(sub: Any) -> None:
    """Register ``jvpn-lab cluster ...`` on the ``jvpn-lab`` subparsers."""
    cl = sub.add_parser("cluster", help="a local cluster (redis, gateways, nginx, prometheus) "
                                        "as processes on loopback, from the deploy/ configs")
    cs = cl.add_subparsers(dest="sub", required=True, metavar="ACTION")

    def run_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                       help=f"state, keys, configs and logs (default {DEFAULT_RUN_DIR})")
        return p

    g = run_dir(cs.add_parser("up", help="start the cluster and wait until every part answers"))
    g.add_argument("--gateways", "-n", type=int, default=DEFAULT_GATEWAYS,
                   help=f"gateway nodes (default {DEFAULT_GATEWAYS})")
    g.add_argument("--host", default="127.0.0.1", help="address every listener binds")
    g.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"public nginx port, UDP and TCP (default {DEFAULT_PORT}; 0 = a free one)")
    g.add_argument("--store-url", default="", help="use this Redis instead of starting one")
    g.add_argument("--redis-cluster", action="store_true",
                   help="start a throwaway Redis Cluster (3 masters + 3 replicas) as the store")
    g.add_argument("--prometheus", action="store_true",
                   help="also run Prometheus (deploy/prometheus, file_sd targets)")
    g.add_argument("--prometheus-port", type=int, default=0, help="default: a free port")
    g.add_argument("--scrape-interval", help="override the scrape/evaluation interval, e.g. 1s")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="gateway_sets",
                   help="gateway config override for every node (repeatable)")
    g.add_argument("--nginx-workers", type=int, default=1,
                   help="nginx worker processes (default 1)")
    g.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S,
                   help=f"seconds each startup wait may take (default {STARTUP_TIMEOUT_S:.0f})")
    g.add_argument("--deploy-dir", default=None, help=f"deploy/ configs (default ${DEPLOY_DIR_ENV} "
                                                      "or this checkout's deploy/)")
    g.add_argument("--json", action="store_true", help="print cluster.json instead of a summary")
    g.set_defaults(fn=cmd_up)

    g = run_dir(cs.add_parser("down", help="stop the processes `up` recorded (and only those)"))
    g.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S,
                   help="seconds to wait after SIGTERM before SIGKILL")
    g.set_defaults(fn=cmd_down)

    g = run_dir(cs.add_parser("status", help="each process alive/dead, each gateway's /readyz"))
    g.add_argument("--json", action="store_true", help="print the status as JSON")
    g.set_defaults(fn=cmd_status)

    g = run_dir(cs.add_parser("restart", help="stop one gateway and start it again "
                                              "(same ports and config), e.g. a rolling restart"))
    g.add_argument("node", help="gateway node id, e.g. gw-1")
    g.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S,
                   help=f"seconds to wait for its /readyz (default {STARTUP_TIMEOUT_S:.0f})")
    g.add_argument("--no-reload", dest="reload", action="store_false",
                   help="do not reload nginx afterwards (it then keeps the restarted node "
                        "demoted while its earlier flows live; see deploy/README.md). "
                        "Exit 1: the gateway did not restart; exit 3: it did, but nginx "
                        "was not reloaded (nginx -t failed, or nginx is gone)")
    g.set_defaults(fn=cmd_restart)

    g = run_dir(cs.add_parser("add-client", help="register a client with the cluster's store "
                                                 "and print its jvpn-agent command"))
    g.add_argument("public_key", nargs="?",
                   help="client public key (hex/base64 or a file); default: generate a key pair")
    g.add_argument("--upstream", action="append", required=True, help="allowed host:port (repeat)")
    g.add_argument("--name", default="", help="a label (also names the generated key file)")
    g.add_argument("--key-out", help="where to write a generated private key "
                                     "(default <run dir>/clients/<name>.key)")
    g.add_argument("--ttl", type=float, default=300.0, help="session TTL when detached, seconds")
    g.add_argument("--max-age", type=float, default=None,
                   help="maximum session age, seconds, however often it reattaches (default 86400)")
    g.add_argument("--rate", type=int, default=30, help="reattach attempts per minute")
    g.add_argument("--transports", default="udp,tcp,quic", help="allowed transports")
    g.set_defaults(fn=cmd_add_client)


def _fail(exc: Exception) -> int:
    print(f"jvpn-lab cluster: {exc}", file=sys.stderr)
    return 1


def cmd_up(args: argparse.Namespace) -> int:
    opts = UpOptions(
        run_dir=Path(args.run_dir),
        deploy_dir=Path(args.deploy_dir) if args.deploy_dir else default_deploy_dir(),
        gateways=args.gateways, host=args.host, port=args.port, store_url=args.store_url,
        redis_cluster=args.redis_cluster, prometheus=args.prometheus,
        prometheus_port=args.prometheus_port, scrape_interval=args.scrape_interval,
        gateway_sets=list(args.gateway_sets), nginx_workers=args.nginx_workers,
        timeout=args.timeout)
    t0 = time.monotonic()
    try:
        state = Launcher(opts).up()
    except ClusterError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(asdict(state), indent=2))
    else:
        print(summary(state))
        print(f"(up in {time.monotonic() - t0:.1f} s)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        results = down(Path(args.run_dir), args.timeout)
    except ClusterError as exc:
        return _fail(exc)
    for proc, how in results:
        print(f"{proc.name:<11} pid {proc.pid:<8} {how}")
    left = [p for p, _ in results if is_alive(p.pid, p.start_ticks)]
    if left:
        return _fail(ClusterError("still running: " + ", ".join(f"{p.name} ({p.pid})" for p in left)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state = ClusterState.load(Path(args.run_dir))
    except ClusterError as exc:
        return _fail(exc)
    rows = check_status(state)
    ok = bool(rows) and all(r["alive"] and r["ready"] for r in rows)
    if args.json:
        print(json.dumps({"run_dir": state.run_dir, "ok": ok, "store_url": state.store_url,
                          "balancer": state.balancer, "prometheus": state.prometheus,
                          "processes": rows}, indent=2))
    else:
        print(f"{'NAME':<11} {'ROLE':<10} {'PID':>8}  {'STATE':<5}  DETAIL")
        for r in rows:
            print(f"{r['name']:<11} {r['role']:<10} {r['pid']:>8}  "
                  f"{'alive' if r['alive'] else 'dead':<5}  {r['detail']}")
        print("all up and ready" if ok else "NOT all up and ready")
    return 0 if ok else 1


def cmd_restart(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        proc, old_pid, how = restart_gateway(Path(args.run_dir), args.node, args.timeout)
    except ClusterError as exc:
        return _fail(exc)
    print(f"{proc.name}: pid {old_pid} {how}; pid {proc.pid} ready "
          f"in {time.monotonic() - t0:.1f} s")
    if not args.reload:
        return 0
    try:
        print(reload_balancer(ClusterState.load(Path(args.run_dir))))
    except ClusterError as exc:
        print(f"error: {proc.name} restarted, but nginx was NOT reloaded: {exc}\n"
              f"(a restarted node stays demoted until then; fix it, then run "
              f"`jvpn-lab cluster restart` again or SIGHUP nginx)", file=sys.stderr)
        return 3
    return 0


def cmd_add_client(args: argparse.Namespace) -> int:
    from session.noise import generate_keypair
    from settings import decode_key

    try:
        state = ClusterState.load(Path(args.run_dir))
    except ClusterError as exc:
        return _fail(exc)
    key_file = ""
    try:
        if args.public_key:
            raw = args.public_key
            if os.path.exists(raw):
                raw = Path(raw).read_text()
            public = decode_key(raw.strip())
        else:
            priv, public = generate_keypair()
            name = args.name or f"client-{public.hex()[:8]}"
            path = Path(args.key_out) if args.key_out else Path(state.run_dir) / "clients" / f"{name}.key"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_secret(path, priv.hex())
            key_file = str(path)
        kek = decode_key((Path(state.run_dir) / "keys" / "kek.key").read_text().strip())
        asyncio.run(_register(state.store_url, kek, public, args.upstream, args.name, args.ttl,
                              args.rate, args.transports.split(","), args.max_age))
    except (ValueError, OSError) as exc:
        return _fail(ClusterError(f"add-client: {exc}"))
    except Exception as exc:  # store errors: one line, not a traceback
        return _fail(ClusterError(f"add-client: {type(exc).__name__}: {exc}"))
    print(f"registered {public.hex()} (upstreams {', '.join(args.upstream)}) "
          f"with {state.store_url}")
    if key_file:
        print(f"private key written to {key_file} (mode 600)")
    b = state.balancer
    print("run the agent:\n"
          f"  jvpn-agent --private-key-file {key_file or '<private key file>'} "
          f"--gateway-public-key {state.gateway_public_key} \\\n"
          f"      --gateway {b.get('udp', '?')} --tcp-gateway {b.get('tcp', '?')} "
          f"--quic-gateway {b.get('quic', '?')} "
          f"--upstream {args.upstream[0]} --local-udp 127.0.0.1:5555")
    return 0

