"""docker-compose.yml, the deploy/ configs and the local launcher agree.

The compose file is validated by the real `docker-compose config` (Debian
package docker-compose; no container engine needed) and its normalized output
is checked structurally: the gateway scales (no fixed names or host ports),
nginx renders deploy/nginx/nginx.conf.template with jvpn.js, Prometheus runs
deploy/prometheus with DNS service discovery. `jvpn-lab cluster up` must use the
very same files (docs/ARCHITECTURE.md, Deploy). Prometheus configs and rules go through
`promtool`; the rendered local nginx config through `nginx -t`; and the
balancer's routing (deploy/nginx/jvpn.js) is exercised with the real nginx in
front of three stand-in upstreams.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import default_node_id, load_gateway_config
from gateway.metrics import Metrics
from instruments import cluster as launcher
from settings import parse_address
from tests.support.local_cluster import ROOT, require_binary

pytestmark = pytest.mark.timeout(60)

DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"


# ---- the normalized compose model ----------------------------------------------------------


def _script_python(script: str) -> str:
    """The interpreter a Python script runs with (its shebang): it has PyYAML when the
    script is docker-compose (python3-yaml is a dependency of the Debian package)."""
    with open(script, "rb") as fp:
        first = fp.readline().decode("utf-8", "replace")
    parts = first[2:].split() if first.startswith("#!") else []
    if parts and os.path.basename(parts[0]) == "env" and len(parts) > 1:
        return parts[1]
    return parts[0] if parts else "/usr/bin/python3"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    dc = require_binary("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "JVPN_"))}
    env.update(JVPN_REDIS_GATEWAY_PASSWORD="g" * 32, JVPN_REDIS_ADMIN_PASSWORD="a" * 32)
    res = subprocess.run([dc, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"docker-compose config rejects docker-compose.yml:\n{res.stderr}"
    conv = subprocess.run(
        [_script_python(dc), "-c",
         "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=res.stdout, capture_output=True, text=True, timeout=30)
    assert conv.returncode == 0, conv.stderr
    model: dict[str, Any] = json.loads(conv.stdout)
    return model


def _volumes(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume, short (src:dst:mode) or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, target, *mode = v.split(":")
            out.append((src, target, "ro" in mode))
        else:
            out.append((v.get("source", ""), v["target"], bool(v.get("read_only"))))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: source path relative to the repo -> container path."""
    return {str(Path(src).relative_to(ROOT)): target
            for src, target, _ in _volumes(service) if src.startswith("/")}


def _gateway_toml_config() -> Any:
    return load_gateway_config(str(DEPLOY / "gateway.toml"), env={})


def test_compose_is_valid_and_complete(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "keys", "gateway", "nginx", "prometheus"} <= set(services)
    assert services["grafana"]["profiles"] == ["grafana"]
    assert services["otel-collector"]["profiles"] == ["otel"]



def test_compose_redis_runs_acl_users_and_tls_only(compose: dict[str, Any]) -> None:
    """Redis in the stack: TLS only (no plain port), the rendered ACL file, a healthcheck
    as the admin user; the gateways connect as jvpn-gateway over rediss:// and verify
    Redis against the CA that redis-init (deploy/redis/init.py) made."""
    services = compose["services"]
    cmd = services["redis"]["command"]
    assert cmd[cmd.index("--port") + 1] == "0" and "--tls-port" in cmd
    assert cmd[cmd.index("--aclfile") + 1] == "/run/redis-conf/users.acl"
    init = services["redis-init"]
    assert "/deploy/redis/init.py" in init["entrypoint"]
    assert services["redis"]["depends_on"]["redis-init"]["condition"] == \
        "service_completed_successfully"
    env = services["gateway"]["environment"]
    assert env["JVPN_GATEWAY_STORE_URL"].startswith("rediss://jvpn-gateway:")
    assert env["JVPN_GATEWAY_STORE_TLS_CA_FILE"] == "/run/redis-conf/ca.crt"
    assert "--user jvpn-admin" in " ".join(services["redis"]["healthcheck"]["test"])


def test_gateway_service_scales(compose: dict[str, Any]) -> None:
    gw = compose["services"]["gateway"]
    # `docker compose up --scale gateway=N`: no fixed container name, no host port.
    assert "container_name" not in gw and "ports" not in gw
    assert Path(gw["build"]["context"]) == ROOT and (ROOT / "Dockerfile").is_file()
    cfg_path = gw["command"][gw["command"].index("--config") + 1]
    assert _mounts(gw)["deploy/gateway.toml"] == cfg_path
    # The environment is valid gateway config on top of the same TOML.
    env = {k: str(v) for k, v in gw["environment"].items() if k.startswith("JVPN_GATEWAY_")}
    cfg = load_gateway_config(str(DEPLOY / "gateway.toml"), env=env)
    assert parse_address(cfg.store_url.split("//")[1].split("/")[0].rpartition("@")[2])[0] \
        in compose["services"]
    # No node id pinned in the TOML: each replica gets <hostname>-<port>.
    assert cfg.node_id == default_node_id(cfg.listen_udp)
    # Every replica reads the shared key and KEK the `keys` service writes.
    _, target, read_only = next(v for v in _volumes(gw) if v[0] == "jvpn-secrets")
    assert read_only
    for f in (cfg.private_key_file, cfg.kek_file):
        assert os.path.dirname(f) == target
        assert os.path.basename(f) in " ".join(compose["services"]["keys"]["command"])
    ports = {f"{parse_address(cfg.listen_udp)[1]}/udp", f"{parse_address(cfg.listen_tcp)[1]}/tcp",
             f"{parse_address(cfg.listen_quic)[1]}/udp", f"{parse_address(cfg.admin)[1]}/tcp"}
    assert set(gw["expose"]) == ports
    assert gw["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert gw["healthcheck"]["test"] == ["CMD", "jvpn-gateway-healthcheck"]


def test_nginx_service_renders_the_same_template(compose: dict[str, Any]) -> None:
    ng = compose["services"]["nginx"]
    env = {k: str(v) for k, v in ng["environment"].items()}
    mounts = _mounts(ng)
    # The image's entrypoint (deploy/containers/nginx-entrypoint.sh) renders
    # /etc/nginx/templates/nginx.conf.template, filling the upstream servers itself
    # from the addresses the gateway service's name resolves to.
    entrypoint = (DEPLOY / "containers" / "nginx-entrypoint.sh").read_text()
    assert mounts["deploy/" + launcher.NGINX_TEMPLATE] == "/etc/nginx/templates/nginx.conf.template"
    assert "JVPN_NGINX_TEMPLATE:-/etc/nginx/templates/nginx.conf.template" in entrypoint
    assert mounts["deploy/" + launcher.NGINX_JS] == env["JVPN_NGINX_JS_DIR"] + "/jvpn.js"
    assert env["JVPN_UPSTREAM_HOST"] == "gateway" and "gateway" in compose["services"]
    cfg = _gateway_toml_config()
    gw_port = parse_address(cfg.listen_udp)[1]
    assert env["JVPN_UPSTREAM_PORT"] == str(gw_port)
    template = (DEPLOY / "nginx" / "nginx.conf.template").read_text()
    names = launcher.template_placeholders(template)
    filled = {"JVPN_UDP_SERVERS", "JVPN_TCP_SERVERS", "JVPN_QUIC_SERVERS", "JVPN_UDP_NODES",
              "JVPN_TCP_NODES"}
    assert filled <= names and all(f"{n}=" in entrypoint for n in filled)
    assert names - filled <= set(env), f"compose leaves {names - filled - set(env)} unset"
    quic_port = parse_address(cfg.listen_quic)[1]
    assert env["JVPN_UPSTREAM_QUIC_PORT"] == str(quic_port)
    servers = " ".join(f"server 172.31.251.{n}:{gw_port};" for n in (2, 3))
    quic_servers = " ".join(f"server 172.31.251.{n}:{quic_port};" for n in (2, 3))
    conf = launcher.render_template(template, {**env, "JVPN_UDP_SERVERS": servers,
                                               "JVPN_TCP_SERVERS": servers,
                                               "JVPN_QUIC_SERVERS": quic_servers,
                                               "JVPN_UDP_NODES": "", "JVPN_TCP_NODES": ""})
    # Neither Docker's resolver address nor `server ... resolve` (nginx >= 1.27.3).
    assert "resolve" not in conf and "127.0.0.11" not in json.dumps(compose)
    assert "hash $jvpn_route consistent;" in conf and "js_preread jvpn.preread;" in conf
    directives = [line.split("#", 1)[0] for line in conf.splitlines()]
    assert not any("proxy_responses" in d for d in directives)
    assert any("proxy_timeout" in d for d in directives)
    assert quic_servers in conf
    assert "js_preread jvpn.quicPreread;" in conf and "proxy_pass $jvpn_quic_target;" in conf
    listen = parse_address(env["JVPN_LISTEN"])[1]
    quic = parse_address(env["JVPN_QUIC_LISTEN"])[1]
    published = {(p["published"], p["protocol"]) for p in ng["ports"]}
    assert published == {(listen, "udp"), (listen, "tcp"), (quic, "udp")}


def test_prometheus_service_discovers_every_replica(compose: dict[str, Any]) -> None:
    pr = compose["services"]["prometheus"]
    mounts = _mounts(pr)
    config_path = next(a.split("=", 1)[1] for a in pr["command"] if a.startswith("--config.file="))
    assert mounts["deploy/" + launcher.PROMETHEUS_CONFIG] == config_path
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    rules_glob = re.search(r"^\s*-\s*(\S+)\s+# jvpn: rule_files", text, re.M)
    assert rules_glob is not None
    assert mounts["deploy/" + launcher.PROMETHEUS_RULES] == os.path.dirname(rules_glob.group(1))
    # DNS SD (type A) on the gateway service name, at the gateway's admin port.
    lines = [line.strip() for line in text.splitlines()]
    sd = "\n".join(lines[lines.index(launcher.SD_BEGIN) + 1:lines.index(launcher.SD_END)])
    admin_port = parse_address(_gateway_toml_config().admin)[1]
    assert "dns_sd_configs" in sd and "type: A" in sd and f"port: {admin_port}" in sd
    assert re.search(r"names:\s*\[gateway\]", sd) and "gateway" in compose["services"]


def test_launcher_uses_the_files_compose_mounts(compose: dict[str, Any]) -> None:
    assert launcher.default_deploy_dir() == DEPLOY
    mounted = set()
    for svc in compose["services"].values():
        mounted |= set(_mounts(svc))
    used = {"deploy/" + launcher.GATEWAY_CONFIG, "deploy/" + launcher.NGINX_TEMPLATE, "deploy/" + launcher.NGINX_JS,
            "deploy/" + launcher.PROMETHEUS_CONFIG, "deploy/" + launcher.PROMETHEUS_RULES}
    assert used <= mounted, f"launcher files compose does not mount: {used - mounted}"
    for rel in used:
        assert (ROOT / rel).exists()
    # Grafana and the collector mount their deploy/ files too.
    assert "deploy/grafana/jumping-vpn.json" in _mounts(compose["services"]["grafana"])
    otel = compose["services"]["otel-collector"]
    assert "deploy/otel/collector.yaml" in _mounts(otel)
    endpoint = compose["services"]["gateway"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = endpoint.split("//")[1].split(":")
    assert host == "otel-collector" and f"{port}/tcp" in otel["expose"]


def _dockerfile_stages() -> dict[str, str]:
    """Each ``FROM ... AS name`` stage of the Dockerfile: name -> its text."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {m.group(1): part for part in parts if (m := re.match(r"\S+ AS (\S+)", part))}


def test_dockerfile_base_image_is_a_build_argument(compose: dict[str, Any]) -> None:
    """Every image starts from ARG BASE_IMAGE; compose builds each service's own target from
    JVPN_BASE_IMAGE (debian:bookworm-slim unless set)."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms[0] == "${BASE_IMAGE}" and all(f in _dockerfile_stages() for f in froms[1:])
    built = {name: svc["build"] for name, svc in compose["services"].items() if "build" in svc}
    assert {b["target"] for b in built.values()} == {"gateway", "redis", "nginx", "prometheus"}
    for name, b in built.items():
        assert b["target"] in _dockerfile_stages(), name
        assert b["args"]["BASE_IMAGE"] == "debian:bookworm-slim", name


def test_dockerfile_matches_the_gateway_config() -> None:
    text = _dockerfile_stages()["gateway"]
    cfg = _gateway_toml_config()
    assert 'ENTRYPOINT ["jvpn-gateway-entrypoint"]' in text
    entrypoint = (DEPLOY / "containers" / "gateway-entrypoint.sh").read_text()
    assert "COPY deploy/containers/gateway-entrypoint.sh /usr/local/bin/jvpn-gateway-entrypoint" in text
    assert entrypoint.rstrip().endswith('exec jvpn-gateway "$@"')
    # The health check is one word, the same in the image and in compose (Podman's API
    # splits an exec-form check's words at spaces); it asks the node's /readyz.
    assert 'CMD ["jvpn-gateway-healthcheck"]' in text
    assert "COPY deploy/containers/gateway-healthcheck.py /usr/local/bin/jvpn-gateway-healthcheck" in text
    assert "/readyz" in (DEPLOY / "containers" / "gateway-healthcheck.py").read_text()
    assert "COPY deploy/gateway.toml /etc/jvpn/gateway.toml" in text
    assert "JVPN_GATEWAY_CONFIG=/etc/jvpn/gateway.toml" in text
    expose = re.search(r"^EXPOSE (.+)$", text, re.M)
    assert expose is not None
    assert set(expose.group(1).split()) == {
        f"{parse_address(cfg.listen_udp)[1]}/udp", f"{parse_address(cfg.listen_tcp)[1]}/tcp",
        f"{parse_address(cfg.admin)[1]}/tcp"}
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# ---- promtool and nginx -t ------------------------------------------------------------------


def test_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    rules = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert rules
    res = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    src = DEPLOY / "prometheus" / "prometheus.yml"
    res = subprocess.run([promtool, "check", "config", "--syntax-only", str(src)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    # The launcher's rendering of the same file: file_sd, the real rules, 1 s intervals.
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"targets": ["127.0.0.1:9100"], "labels": {"node": "gw-1"}}]))
    local = tmp_path / "prometheus.yml"
    local.write_text(launcher.render_prometheus(
        src.read_text(), targets_file=str(targets), rules_dir=str(DEPLOY / "prometheus" / "rules"),
        interval="1s"))
    res = subprocess.run([promtool, "check", "config", str(local)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr and "rules found" in res.stdout + res.stderr
    rendered = local.read_text()
    assert "dns_sd_configs" not in rendered and "scrape_interval: 1s" in rendered


def test_render_prometheus_requires_its_markers() -> None:
    src = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    with pytest.raises(launcher.ClusterError, match="jvpn-sd"):
        launcher.render_prometheus(src.replace(launcher.SD_END, ""), targets_file="t",
                                   rules_dir="r")
    with pytest.raises(launcher.ClusterError, match="scrape_interval"):
        launcher.render_prometheus(src.replace("# jvpn: scrape_interval", ""),
                                   targets_file="t", rules_dir="r")
    with pytest.raises(launcher.ClusterError, match="interval"):
        launcher.render_prometheus(src, targets_file="t", rules_dir="r", interval="fast")
    with pytest.raises(launcher.ClusterError, match="JVPN_LISTEN"):
        launcher.render_template("listen ${JVPN_LISTEN};", {})


def _render_local_nginx(run: Path, udp: list[str], tcp: list[str], listen: str) -> Path:
    nginx = require_binary("nginx", "nginx")
    require_binary("ngx_stream_js_module.so", "libnginx-mod-stream-js",
                   "/usr/lib/nginx/modules/ngx_stream_js_module.so")
    values = launcher.nginx_values(
        listen=listen, udp_servers=udp, tcp_servers=tcp, modules=launcher.nginx_modules(nginx),
        js_dir=str(DEPLOY / "nginx"), pid=str(run / "nginx.pid"),
        error_log=str(run / "error.log"), access_log=str(run / "access.log"), udp_idle="5s",
        tcp_idle="5s", quic_listen=f"127.0.0.1:{launcher.free_port('127.0.0.1', udp_too=True)}",
        quic_servers=udp, quic_nodes=[(i, a) for i, a in enumerate(udp, 1)])
    conf = run / "nginx.conf"
    conf.write_text(launcher.render_template((DEPLOY / launcher.NGINX_TEMPLATE).read_text(),
                                             values))
    return conf


def test_local_nginx_render_passes_nginx_t(tmp_path: Path) -> None:
    conf = _render_local_nginx(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"],
                               ["127.0.0.1:1", "127.0.0.1:2"],
                               f"127.0.0.1:{launcher.free_port('127.0.0.1', udp_too=True)}")
    res = subprocess.run([require_binary("nginx", "nginx"), "-t", "-p", str(tmp_path), "-c",
                          str(conf), "-e", str(tmp_path / "error.log")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


# ---- the balancer's routing, with stand-in upstreams ----------------------------------------


class StandIn:
    """``count`` upstreams on UDP and TCP that answer with their own port (UDP: three replies).

    One upstream's UDP side can go away and come back on the same port (a restart).
    """

    def __init__(self, count: int = 3) -> None:
        self.ports: list[int] = []
        self.socks: list[socket.socket] = []
        self.udp: dict[int, tuple[socket.socket, threading.Thread, threading.Event]] = {}
        self.stopped = False
        self.nginx: subprocess.Popen[bytes] | None = None  # set by the balancer fixture
        self.tcp_threads: list[threading.Thread] = []
        for _ in range(count):
            port = launcher.free_port("127.0.0.1", udp_too=True)
            self.start_udp(port)
            t = socket.socket()
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind(("127.0.0.1", port))
            t.listen()
            self.ports.append(port)
            self.socks.append(t)
            self.tcp_threads.append(threading.Thread(target=self._tcp, args=(t, port),
                                                     daemon=True))
            self.tcp_threads[-1].start()

    def start_udp(self, port: int) -> None:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", port))
        u.settimeout(0.05)  # the loop sees its stop flag within 50 ms
        stop = threading.Event()
        thread = threading.Thread(target=self._udp, args=(u, port, stop), daemon=True)
        self.udp[port] = (u, thread, stop)
        thread.start()

    def stop_udp(self, port: int) -> None:
        """Close the port's UDP socket: datagrams to it now get ICMP port unreachable."""
        u, thread, stop = self.udp.pop(port)
        stop.set()
        thread.join(5)
        u.close()

    def _udp(self, s: socket.socket, port: int, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for i in range(3):  # a three-datagram answer: all must reach the client
                s.sendto(f"{port}:{i}".encode(), addr)

    def _tcp(self, s: socket.socket, port: int) -> None:
        while not self.stopped:
            try:
                c, _ = s.accept()
            except OSError:
                return
            with c:
                c.settimeout(2)
                try:
                    c.recv(4096)
                    c.sendall(str(port).encode())
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        for port in list(self.udp):
            self.stop_udp(port)
        # shutdown wakes a thread blocked in accept(); only then is the descriptor closed.
        # Closed under a blocked accept(), its number could go to the next test's
        # listener, and this thread would answer that one's connections with its port.
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for thread in self.tcp_threads:
            thread.join(5)
        for s in self.socks:
            s.close()


@pytest.fixture(params=[3])
def balancer(tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[tuple[tuple[str, int], StandIn]]:
    ups = StandIn(request.param)
    port = launcher.free_port("127.0.0.1", udp_too=True)
    servers = [f"127.0.0.1:{p}" for p in ups.ports]
    conf = _render_local_nginx(tmp_path, servers, servers, f"127.0.0.1:{port}")
    nginx = require_binary("nginx", "nginx")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-e",
                             str(tmp_path / "error.log"), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ups.nginx = proc
    try:
        deadline = time.monotonic() + 10
        while not launcher.tcp_accepts("127.0.0.1", port):
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen within 10 s"
            time.sleep(0.02)
        yield ("127.0.0.1", port), ups
    finally:
        proc.terminate()
        proc.wait(10)
        ups.close()


def _message(kind: int, ident: bytes, route: int = 0) -> bytes:
    return struct.pack("!BBH16s", 1, kind, route, ident) + b"\x00" * 48


def _udp_ask(addr: tuple[str, int], data: bytes, stack: contextlib.ExitStack,
             timeout: float = 2.0) -> list[bytes]:
    """Send from a new source port and read the three-datagram answer.

    The socket stays open until `stack` closes, so no two asks in one test share a
    source port. nginx keys a UDP flow by the client's address:port and runs preread
    only on a flow's first datagram: an ephemeral port the kernel handed out again
    within the flow's idle timeout would join the earlier flow and reach its node,
    whatever the new message's session id (routing is an optimisation; that node
    accepts the reattach like any other).
    """
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.settimeout(timeout)
    s.sendto(data, addr)
    return [s.recv(100) for _ in range(3)]


def _tcp_ask(addr: tuple[str, int], data: bytes, dribble: bool = True) -> bytes:
    frame = struct.pack("!H", len(data)) + data
    with socket.create_connection(addr, timeout=2) as s:
        for b in frame[:8] if dribble else b"":  # preread waits for the whole header
            s.sendall(bytes([b]))
            time.sleep(0.005)
        s.sendall(frame[8:] if dribble else frame)
        return s.recv(100)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Holds every socket `_udp_ask` opens until the test ends: distinct source ports."""
    with contextlib.ExitStack() as s:
        yield s


def test_balancer_routes_by_session_id(balancer: tuple[tuple[str, int], StandIn],
                                       stack: contextlib.ExitStack) -> None:
    addr, _ = balancer
    DATA, REATTACH, HANDSHAKE_INIT = 4, 5, 1
    owners = []
    for _ in range(12):
        sid = os.urandom(16)
        seen = set()
        for kind in (REATTACH, DATA, DATA, REATTACH):  # four flows, four source ports
            replies = _udp_ask(addr, _message(kind, sid), stack)
            assert len({r.split(b":")[1] for r in replies}) == 3  # proxy_responses unset
            seen.add(replies[0].split(b":")[0])
        seen.add(_tcp_ask(addr, _message(REATTACH, sid)))  # TCP: same key, same node
        assert len(seen) == 1, f"session {sid.hex()} routed to {seen}"
        owners.append(seen.pop())
    assert len(set(owners)) >= 2, "12 sessions all on one node: the key is not the session id"
    # HANDSHAKE_INIT carries a random handshake id: routed by source address, which spreads
    # (a RETRY and the repeated INIT share the flow, so they stay together anyway).
    hs = {_udp_ask(addr, _message(HANDSHAKE_INIT, os.urandom(16)), stack)[0].split(b":")[0]
          for _ in range(12)}
    assert len(hs) >= 2
    # A runt (shorter than the header) still goes somewhere, to be counted as a drop there.
    assert len(_udp_ask(addr, b"\x01", stack)) == 3


def test_reload_clears_a_restarted_upstreams_failure_mark(
        balancer: tuple[tuple[str, int], StandIn], stack: contextlib.ExitStack) -> None:
    """Why `jvpn-lab cluster restart` reloads nginx: a restarted node is demoted until then.

    nginx marks an upstream failed when sending to it fails (a datagram after an ICMP
    port unreachable on the same flow: "upstream server temporarily disabled") and
    clears the mark only when a flow to it ends. The sessions hashed to it go
    elsewhere even after it is back; a reload (new workers, fresh upstream state)
    sends them home again.
    """
    addr, ups = balancer
    assert ups.nginx is not None
    REATTACH = 5
    sid = os.urandom(16)
    home = int(_udp_ask(addr, _message(REATTACH, sid), stack)[0].split(b":")[0])
    ups.stop_udp(home)  # the node restarts: its flows get ICMP port unreachable
    dead = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    for _ in range(5):  # an agent's retries: a send after the ICMP fails, nginx marks it
        dead.sendto(_message(REATTACH, sid), addr)
        time.sleep(0.02)
    time.sleep(0.2)
    ups.start_udp(home)  # back on the same port
    moved = int(_udp_ask(addr, _message(REATTACH, sid), stack)[0].split(b":")[0])
    assert moved != home, "nginx did not demote the failed upstream (is max_fails set?)"
    assert launcher.reload_nginx(ups.nginx.pid, None), "nginx started no new worker"
    # The old worker stops reading the shared port once it retires: ask until the
    # answer comes from the new worker (bounded), which hashes to the home node.
    answers = []
    for _ in range(20):
        answers.append(int(_udp_ask(addr, _message(REATTACH, sid), stack)[0]
                           .split(b":")[0]))
        if answers[-1] == home:
            break
        time.sleep(0.1)
    assert answers[-1] == home, f"after the reload still routed to {answers}, not {home}"


def _ring_order(servers: list[str], key: str) -> list[str]:
    """nginx's consistent-hash ring, modelled independently of jvpn.js (zlib's CRC-32):
    the distinct servers met walking it from ``key``'s point. A server "host:port" has
    160 points, crc32(host NUL port prev), prev the previous point's 4 bytes
    little-endian (0 at first); a key goes to the first point >= crc32(key), wrapping."""
    points: dict[int, str] = {}
    for name in servers:
        host, _, port = name.rpartition(":")
        base = zlib.crc32(host.encode() + b"\0" + port.encode())
        prev = 0
        for _ in range(160):
            prev = zlib.crc32(struct.pack("<I", prev), base)
            points.setdefault(prev, name)
    ring = sorted(points.items())
    start = bisect.bisect_left([p for p, _ in ring], zlib.crc32(key.encode()))
    order: list[str] = []
    for i in range(len(ring)):
        name = ring[(start + i) % len(ring)][1]
        if name not in order:
            order.append(name)
    return order


@pytest.mark.parametrize("balancer", [3, 4], indirect=True)
def test_route_hints_reach_each_other_node_in_turn(
        balancer: tuple[tuple[str, int], StandIn], stack: contextlib.ExitStack) -> None:
    """A REATTACH_REQUEST with route hint k > 0 goes to the k-th other node of its session.

    For many session ids: hint 0 reaches the node nginx's group picks, which is the
    one the ring model above computes (so the model is nginx's ring); hints 1..N-1
    each reach one of the OTHER nodes, each exactly once, in the model's ring order;
    hint N is the usual node and N + 1 (and 255) continue the cycle. jvpn.js computes its own copy of
    the ring: had it taken another node for the usual one, a hint would land on
    nginx's usual node. Over TCP too (its own group, the same servers).
    """
    addr, ups = balancer
    n = len(ups.ports)
    servers = [f"127.0.0.1:{p}" for p in ups.ports]
    REATTACH = 5

    def udp(sid: bytes, route: int) -> str:
        replies = _udp_ask(addr, _message(REATTACH, sid, route), stack)
        return "127.0.0.1:" + replies[0].split(b":")[0].decode()

    def tcp(sid: bytes, route: int) -> str:
        return "127.0.0.1:" + _tcp_ask(addr, _message(REATTACH, sid, route),
                                       dribble=False).decode()

    usual_nodes = set()
    for i in range(30):
        sid = os.urandom(16)
        order = _ring_order(servers, "s" + sid.hex())
        for ask in (udp, tcp) if i < 10 else (udp,):
            usual = ask(sid, 0)
            assert usual == order[0], f"{ask.__name__} {sid.hex()}: nginx chose {usual}"
            hinted = [ask(sid, k) for k in range(1, n)]
            assert usual not in hinted, f"{ask.__name__} {sid.hex()}: hints {hinted}"
            assert sorted(hinted) == sorted(set(servers) - {usual})
            assert hinted == order[1:], f"{ask.__name__} {sid.hex()}: not the ring's order"
            # Hint N: the usual node again, by address (two others not answering must not
            # keep a client from it), then the others again; 255 wraps to 1 in the agent.
            assert [ask(sid, k) for k in (n, n + 1)] == [usual, hinted[0]]
            assert ask(sid, 255) == order[255 % n]
            usual_nodes.add(usual)
    assert len(usual_nodes) >= 2, "30 sessions all on one node: the key is not the session id"
    # A hint only in a REATTACH_REQUEST: a DATA message's flags are not a route.
    sid = os.urandom(16)
    assert {udp(sid, 0)} == {"127.0.0.1:" + _udp_ask(addr, _message(4, sid, 1), stack)[0]
                             .split(b":")[0].decode()}


# ---- dashboard ------------------------------------------------------------------------------


def _exposed_metric_names() -> set[str]:
    m = Metrics("t", process_metrics=False)
    m.transport_switch("udp", "tcp", "reattach")
    m.state_change("ATTACHED", "RECOVERING")
    m.reattach("ok", "", 0.001)
    m.reattach("rejected", "STALE_VERSION", 0.001)
    m.handshake("ok", "")
    m.security("replayed_nonce")
    m.store_latency("reattach", 0.001)
    m.set_store_up(True)
    m.count_drop("MALFORMED", "udp")
    text = m.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_dashboard_panels_and_metric_names() -> None:
    dash = json.loads((DEPLOY / "grafana" / "jumping-vpn.json").read_text())
    assert dash["uid"] == "jumping-vpn" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    required = [
        'sum by (state) (jvpn:sessions:by_node{node=~"$node"})',
        'sum by (reason) (jvpn:transport_switch:rate1m_by_node{node=~"$node"})',
        "jvpn:reattach_latency_seconds:p99_5m_by_node",
        'jvpn:reattach:rate5m_by_node{outcome="rejected", node=~"$node"}',
        'sum by (node, outcome) (jvpn:reattach:rate5m_by_node{node=~"$node"})',
        "jvpn:store_latency_seconds:p99_5m_by_node",
        "jvpn_security_events_total",
    ]
    for want in required:
        assert any(want in e for e in exprs), f"no panel queries {want}"
    # A node variable from the nodes' info metric; every panel but the count of targets
    # follows it.
    [var] = [v for v in dash["templating"]["list"] if v["name"] == "node"]
    assert var["definition"] == "label_values(jvpn_node_info, node)" and var["includeAll"]
    assert all('node=~"$node"' in e for e in exprs if not e.startswith("count(up"))
    # The recording rules are used: by the dashboard, or by an alert or another rule.
    rules_text = (DEPLOY / "prometheus" / "rules" / "jvpn.rules.yml").read_text()
    records = re.findall(r"^\s*- record: (\S+)$", rules_text, re.M)
    assert len(records) >= 8
    for record in records:
        elsewhere = rules_text.replace(f"record: {record}\n", "")
        assert any(record in e for e in exprs) or re.search(rf"{re.escape(record)}\b", elsewhere), \
            f"recording rule {record} is used nowhere"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
    # Every jvpn_* name in the dashboard and the rules is one a gateway exports.
    exposed = _exposed_metric_names()
    rules = "".join(p.read_text() for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    for name in set(re.findall(r"\bjvpn_[a-z0-9_]+", " ".join(exprs) + rules)):
        # a histogram may be named by its family (jvpn_store_latency_seconds)
        assert name in exposed or f"{name}_bucket" in exposed, \
            f"{name} is not a metric the gateway exports"


# ---- Redis ACL users and TLS (deploy/redis/users.acl) ----------------------------------------


@contextlib.contextmanager
def _acl_redis(tmp: Path, tls: bool) -> Iterator[tuple[int, dict[str, str]]]:
    """redis-server with deploy/redis/users.acl rendered as compose does (and TLS only)."""
    import hashlib
    import secrets
    import sys

    from store.embedded import free_port

    binary = require_binary("redis-server", "redis-server")
    pw = {"gateway": secrets.token_hex(16), "admin": secrets.token_hex(16)}
    # Exactly what the compose stack's redis-init runs (certificates, then the ACL file).
    env = {"JVPN_REDIS_GATEWAY_PASSWORD": pw["gateway"], "JVPN_REDIS_ADMIN_PASSWORD": pw["admin"],
           "JVPN_REDIS_TLS_NAMES": "127.0.0.1,redis"}
    script = DEPLOY / "redis" / "init.py"
    res = subprocess.run([sys.executable, str(script), str(tmp)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    assert (tmp / "users.acl").stat().st_mode & 0o077 == 0
    assert hashlib.sha256(pw["gateway"].encode()).hexdigest() in (tmp / "users.acl").read_text()
    port = free_port("127.0.0.1")
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--aclfile", str(tmp / "users.acl"), "--dir", str(tmp)]
    if tls:
        ca, crt, key = tmp / "ca.crt", tmp / "redis.crt", tmp / "redis.key"
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(crt),
                 "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                 "--tls-auth-clients", "no"]
    else:
        args += ["--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"redis-server did not start with the ACL file:\n{out[-2000:]}")
            time.sleep(0.05)
        yield port, pw
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("tls", [False, True], ids=["acl", "acl+tls"])
async def test_redis_acl_users_limit_the_gateway(tmp_path: Path, tls: bool) -> None:
    """The gateway user runs births, reattaches and registry reads, and nothing else:
    no registry write, no FLUSHALL, no CONFIG; the default user is off. Over TLS the
    server is verified against the CA file (store_tls_ca_file)."""
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    from session.keys import registry_key
    from session.wire import TransportKind
    from store.api import SessionStore, StoreConfig
    from store.policy import ClientPolicy

    with _acl_redis(tmp_path, tls) as (port, pw):
        scheme = "rediss" if tls else "redis"
        cfg = StoreConfig(tls_ca_file=str(tmp_path / "ca.crt") if tls else "")
        key = registry_key(b"k" * 32)
        admin = SessionStore(f"{scheme}://jvpn-admin:{pw['admin']}@127.0.0.1:{port}/0", cfg,
                             registry_key=key)
        gw = SessionStore(f"{scheme}://jvpn-gateway:{pw['gateway']}@127.0.0.1:{port}/0", cfg,
                          registry_key=key)
        anon = aioredis.Redis.from_url(f"{scheme}://127.0.0.1:{port}/0", **cfg.tls_kwargs(scheme))
        try:
            policy = await admin.add_client(ClientPolicy(b"c" * 32, upstreams=("10.0.0.1:53",)))
            assert await gw.get_client(policy.public_key) == policy
            await gw.load_scripts()
            sid = os.urandom(16)
            born = await gw.birth(sid, wrapped_secret=os.urandom(61), node="n1",
                                  binding_id=os.urandom(16), kind=TransportKind.UDP,
                                  upstream="10.0.0.1:53", policy=policy)
            assert born.ok, born
            moved = await gw.reattach(sid, expected_version=born.version, nonce=os.urandom(16),
                                      timestamp_ms=born.server_ms, kind=TransportKind.UDP,
                                      node="n2", addr_tag="udp:10.0.0.9:4000")
            assert moved.ok, moved
            assert await gw.claim_handshake(os.urandom(32), 1000)
            await gw.publish_binding_change(sid, "n2", moved.epoch)
            assert await gw.xadd_event({"event": "x"})
            await gw.register_node("n2", {"admin": "10.0.0.2:9100"}, 15)  # for `jvpn status`
            assert [n["node"] for n in await admin.list_nodes()] == ["n2"]
            for denied in (gw.redis.flushall(), gw.redis.config_get("*"),
                           gw.redis.hset("jvpn:client:" + "00" * 32, "name", "x"),
                           gw.redis.set("elsewhere", "1"), admin.redis.flushall(),
                           admin.redis.config_get("*")):
                with pytest.raises((NoPermissionError, ResponseError)):
                    await denied
            with pytest.raises((AuthenticationError, ResponseError)):
                await anon.ping()
        finally:
            await anon.aclose()
            await gw.close()
            await admin.close()


# ---- systemd units (deploy/systemd) ------------------------------------------------------------


def test_systemd_units_verify_and_run_what_exists(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the units (with the venv they name replaced by this
    one); each runs a command and flags this checkout has; an agent refused for good (exit
    3) is not restarted."""
    import shutil
    import sys

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    bindir = os.path.dirname(sys.executable)
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"jvpn-gateway.service", "jvpn-agent@.service"}
    for unit in units:
        text = unit.read_text().replace("/opt/jumping-vpn/.venv/bin", bindir)
        name = unit.name.replace("@.", "@test.")
        (tmp_path / name).write_text(text)
        res = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (res.stdout + res.stderr).splitlines()
                    if name in ln or "Unknown" in ln or "error" in ln.lower()]
        assert res.returncode == 0 and not problems, res.stdout + res.stderr
    agent = (DEPLOY / "systemd" / "jvpn-agent@.service").read_text()
    from agent.cli import EXIT_REFUSED

    assert f"RestartPreventExitStatus={EXIT_REFUSED}" in agent
    # The flags the units pass exist (parsed, not run).
    from agent.cli import build_parser as agent_parser
    from gateway.cli import build_parser as gateway_parser

    gateway_parser().parse_args(["--log-format", "json", "--private-key-file", "k",
                                 "--kek-file", "k", "--check-config"])
    agent_parser().parse_args(["--log-format", "json", "--private-key-file", "k",
                               "--set", "status_interval_s=0"])


def test_the_gateway_image_carries_every_product_package() -> None:
    """Every package the product installs (pyproject's find include, the lab instruments
    aside) is copied into the image before `pip install /src`: a missing one is an image
    whose gateway cannot even import."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include} - {"instruments"}
    text = (ROOT / "Dockerfile").read_text()
    missing = {p for p in packages if f"COPY {p} /src/{p}" not in text}
    assert not missing, f"the Dockerfile does not copy {sorted(missing)}"
