"""docker-compose.yml in a real container engine, unmodified.

Builds every image from a local Debian base (deploy/containers/debian-base.sh:
debootstrap, cached per machine), brings the stack up with `--scale gateway=3`
under a project name of its own, registers a client by `exec` in the admin
service, runs agents on the host through the balancer's published UDP port (a
UDP echo in the stack is their upstream), kills the replica that holds the most
sessions, and checks that Prometheus discovered the three replicas, then no
longer scrapes the killed one, that nginx's entrypoint dropped it, and that
every session survived on another replica with the same session id; a second
`up` brings the replica back into nginx and Prometheus. The gateway image keeps
its HEALTHCHECK, and the check passes. `docker-compose down -v` removes what the
project made (containers, network, volumes); the built images stay, as the
cache of the next run.

The engine: $DOCKER_HOST if set (Docker, or a Podman service you run), else a
`podman system service` this module starts on a socket in its temp dir (with
deploy/containers/containers.conf unless $CONTAINERS_CONF is set) and stops by
pid. Skipped, with the reason, where none can run (no podman or docker-compose
and not root, no debootstrap base and not root, an engine that cannot start).
Prints ``FIGURE:`` lines: base image, build, stack start and the sessions' move.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from store.embedded import free_port as embedded_free_port
from tests.support.local_cluster import ROOT, require_binary

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1500)]

COMPOSE = ROOT / "docker-compose.yml"
ECHO = Path(__file__).with_name("echo.yml")
BASE_SCRIPT = ROOT / "deploy" / "containers" / "debian-base.sh"
CONTAINERS_CONF = ROOT / "deploy" / "containers" / "containers.conf"
IMAGE_TAG = "test"
GATEWAYS = 3
AGENTS = 6


def figure(name: str, value: float, unit: str, **detail: object) -> None:
    extra = " ".join(f"{k}={v}" for k, v in detail.items())
    print(f"FIGURE: {name} = {value:.2f} {unit} {extra}".rstrip(), flush=True)


def poll(what: str, timeout: float, check: Callable[[], Any], interval: float = 0.5) -> Any:
    """check() until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval)


def free_port() -> int:
    """A port free for both UDP and TCP on every address (the balancer publishes both on
    0.0.0.0), below the kernel's ephemeral range so no outgoing socket takes it before the
    engine binds it."""
    return embedded_free_port("0.0.0.0", udp_too=True)


# ---- the engine ------------------------------------------------------------------------------


@dataclass
class Engine:
    docker_host: str
    cli: str  # podman or docker: makes and imports the base image
    env: dict[str, str]
    pid: int | None = None  # the podman service this module started


def _start_podman_service(podman: str, run_dir: Path, env: dict[str, str]) -> Engine:
    sock = run_dir / "podman.sock"
    log = open(run_dir / "podman-service.log", "wb")
    proc = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{sock}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log.close()
    engine = Engine(f"unix://{sock}", podman, env, proc.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            if b"OK" in s.recv(4096):
                return engine
        time.sleep(0.2)
    _stop_podman_service(engine)
    pytest.skip(
        "podman system service did not start: "
        + (run_dir / "podman-service.log").read_text(errors="replace")[-800:]
    )


def _stop_podman_service(engine: Engine) -> None:
    if engine.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(engine.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid, _ = os.waitpid(engine.pid, os.WNOHANG)
        if pid:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(engine.pid, signal.SIGKILL)
    os.waitpid(engine.pid, 0)


def _require_answer(docker_host: str) -> None:
    """Skip unless the engine at ``docker_host`` answers the Docker API's ping."""
    import docker

    try:
        client = docker.DockerClient(base_url=docker_host, timeout=10)
        client.ping()
        client.close()
    except Exception as exc:  # the SDK raises several kinds; any means no engine here
        pytest.skip(f"no container engine answers at {docker_host}: {exc}")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    if os.environ.get("DOCKER_HOST"):
        cli = shutil.which("docker") or shutil.which("podman")
        if cli is None:
            pytest.skip(
                "DOCKER_HOST is set but neither docker nor podman is installed "
                "(the base image is imported with one)"
            )
        _require_answer(os.environ["DOCKER_HOST"])
        yield Engine(os.environ["DOCKER_HOST"], cli, env)
        return
    if (
        not shutil.which("podman")
        and os.path.exists("/var/run/docker.sock")
        and shutil.which("docker")
    ):
        _require_answer("unix:///var/run/docker.sock")
        yield Engine("unix:///var/run/docker.sock", "docker", env)
        return
    podman = require_binary("podman", "podman")
    require_binary("runc", "runc")
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    info = subprocess.run(
        [podman, "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    with tempfile.TemporaryDirectory(prefix="jvpn-podman-") as run_dir:
        eng = _start_podman_service(podman, Path(run_dir), env)
        try:
            yield eng
        finally:
            _stop_podman_service(eng)


@pytest.fixture(scope="module")
def base_image(engine: Engine) -> str:
    """JVPN_BASE_IMAGE if set; else the debootstrap base (made once per machine)."""
    if os.environ.get("JVPN_BASE_IMAGE"):
        return os.environ["JVPN_BASE_IMAGE"]
    if os.geteuid() != 0:
        pytest.skip("making the debootstrap base image needs root (or set JVPN_BASE_IMAGE)")
    require_binary("debootstrap", "debootstrap")
    t0 = time.monotonic()
    res = subprocess.run(
        ["sh", str(BASE_SCRIPT), Path(engine.cli).name],
        capture_output=True,
        text=True,
        timeout=900,
        env=engine.env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"debian-base.sh failed:\n{res.stderr[-2000:]}"
    figure("containers_base_image", time.monotonic() - t0, "s", made="debootstrap" in res.stderr)
    return res.stdout.strip().splitlines()[-1]


# ---- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    engine: Engine
    project: str
    env: dict[str, str]
    port: int
    prometheus_port: int
    compose: str
    client: Any  # docker.DockerClient
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.compose, "-p", self.project, "-f", str(COMPOSE), "-f", str(ECHO), *args]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert res.returncode == 0, (
                f"{' '.join(args)} failed:\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
            )
        return res

    def containers(self, service: str) -> list[Any]:
        return self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )

    def address(self, container: Any) -> str:
        nets = container.attrs["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def targets(self) -> dict[str, str]:
        """Prometheus's active targets: instance -> health."""
        import urllib.request

        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/targets?state=active"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                data = json.load(r)
        except OSError:
            return {}
        return {t["labels"]["instance"]: t["health"] for t in data["data"]["activeTargets"]}


def _free_subnet_prefix(client: Any) -> str:
    used = set()
    for net in client.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                used.add(ipaddress.ip_network(cfg["Subnet"], strict=False))
    start = secrets.randbelow(50)
    for i in range(50):
        third = 200 + (start + i) % 50
        net = ipaddress.ip_network(f"172.31.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return f"172.31.{third}"
    pytest.skip("no free 172.31.200-249.0/24 subnet for the stack's network")


@pytest.fixture(scope="module")
def stack(engine: Engine, base_image: str) -> Iterator[Stack]:
    import docker

    dc = require_binary("docker-compose", "docker-compose")
    client = docker.DockerClient(base_url=engine.docker_host, timeout=120)
    env = dict(engine.env)
    env.update(
        DOCKER_HOST=engine.docker_host,
        JVPN_BASE_IMAGE=base_image,
        JVPN_IMAGE_TAG=IMAGE_TAG,
        JVPN_PORT=str(free_port()),
        JVPN_PROMETHEUS_PORT=str(free_port()),
        JVPN_QUIC_PORT=str(free_port()),
        JVPN_SUBNET_PREFIX=_free_subnet_prefix(client),
        JVPN_REDIS_GATEWAY_PASSWORD=secrets.token_hex(24),
        JVPN_REDIS_ADMIN_PASSWORD=secrets.token_hex(24),
    )
    project = f"jvpnct{secrets.token_hex(3)}"
    s = Stack(
        engine, project, env, int(env["JVPN_PORT"]), int(env["JVPN_PROMETHEUS_PORT"]), dc, client
    )
    try:
        t0 = time.monotonic()
        s.run("build", timeout=1200)
        s.timings["build"] = time.monotonic() - t0
        figure("containers_build", s.timings["build"], "s", base=base_image)
        t0 = time.monotonic()
        s.run("up", "-d", "--scale", f"gateway={GATEWAYS}", timeout=300)
        s.timings["up"] = time.monotonic() - t0
        figure("containers_up", s.timings["up"], "s", gateways=GATEWAYS)
        yield s
    except BaseException:
        with contextlib.suppress(Exception):
            print(s.run("logs", "--no-color", "--tail", "40", check=False).stdout[-8000:])
        raise
    finally:
        ids = {
            c.id
            for c in client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            )
        }
        s.run("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
        left = client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={project}"}
        )
        client.close()
        _stop_exec_monitors(ids)
        assert not left, f"down left containers: {[c.name for c in left]}"


def _stop_exec_monitors(container_ids: set[str]) -> None:
    """End the conmon processes that Podman 4.3 leaves behind for the `exec` sessions of
    removed containers (they outlive the container; found by pid, with the container id on
    their command line)."""
    if not container_ids:
        return
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"conmon") or b"-c" not in argv:
            continue
        i = argv.index(b"-c")
        if i + 1 < len(argv) and argv[i + 1].decode(errors="replace") in container_ids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)


# ---- agents on the host ----------------------------------------------------------------------


class AgentProcess:
    """A jvpn-agent child; a thread keeps its latest status line (and when it came)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from agent.cli import main; sys.exit(main())",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        self.status: dict[str, Any] = {}
        self.history: list[tuple[float, dict[str, Any]]] = []
        self.local: tuple[str, int] | None = None
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            del self.lines[:-40]
            m = re.match(r"local UDP port: \('([\d.]+)', (\d+)\)", line)
            if m:
                self.local = (m.group(1), int(m.group(2)))
            elif line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.status = json.loads(line)
                    self.history.append((time.monotonic(), self.status))

    def echo(self, payload: bytes, timeout: float = 15.0) -> bool:
        """A datagram through the session to the echo upstream and back."""
        assert self.local is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.5)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s.sendto(payload, self.local)
                with contextlib.suppress(TimeoutError):
                    while True:
                        data, _ = s.recvfrom(65535)
                        if data == payload:
                            return True
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._thread.join(timeout=5)


# ---- the tests -------------------------------------------------------------------------------


def test_images_keep_their_healthcheck_and_base(stack: Stack, base_image: str) -> None:
    """The gateway image carries its HEALTHCHECK (built in the docker format: Podman's OCI
    format would drop it), and every image was built on BASE_IMAGE."""
    # Asked of the engine's CLI: Podman 4.3's Docker-compatible API leaves it out of an
    # image's Config even when the image has it.
    image = f"jumping-vpn/gateway:{IMAGE_TAG}"
    fmt = (
        "{{json .HealthCheck}}"
        if Path(stack.engine.cli).name == "podman"
        else "{{json .Config.Healthcheck}}"
    )
    res = subprocess.run(
        [stack.engine.cli, "image", "inspect", "--format", fmt, image],
        capture_output=True,
        text=True,
        timeout=60,
        env=stack.engine.env,
    )
    assert res.returncode == 0, res.stderr
    health = json.loads(res.stdout) or {}
    assert health.get("Test") == ["CMD", "jvpn-gateway-healthcheck"], (
        f"{image} has no HEALTHCHECK: {res.stdout}"
    )
    base_layers = stack.client.images.get(base_image).attrs["RootFS"]["Layers"]
    for name in ("gateway", "redis", "nginx", "prometheus"):
        layers = stack.client.images.get(f"jumping-vpn/{name}:{IMAGE_TAG}").attrs["RootFS"][
            "Layers"
        ]
        assert layers[: len(base_layers)] == base_layers, f"{name} is not built on {base_image}"


def test_stack_serves_agents_and_keeps_their_sessions_when_a_replica_dies(
    stack: Stack, tmp_path: Path
) -> None:
    # Node ids: gateway-<n>, the replica's index in its container name.
    gateways = {"gateway-" + re.split(r"[-_]", c.name)[-1]: c for c in stack.containers("gateway")}
    assert set(gateways) == {f"gateway-{n}" for n in range(1, GATEWAYS + 1)}, gateways
    ip_of = {name: stack.address(c) for name, c in gateways.items()}
    admin_port = 9100

    # Prometheus finds every replica by DNS and scrapes it.
    want = {f"{ip}:{admin_port}" for ip in ip_of.values()}
    poll(
        "Prometheus to scrape all three replicas",
        120,
        lambda: (t := stack.targets()) and set(t) == want and all(h == "up" for h in t.values()),
    )

    # The image's health check passes on a live replica. Podman runs checks from systemd
    # timers, so where there is no systemd it is run on demand here; Docker runs it itself.
    some = next(iter(gateways.values()))
    if Path(stack.engine.cli).name == "podman":

        def healthy() -> bool:
            res = subprocess.run(
                [stack.engine.cli, "healthcheck", "run", some.name],
                capture_output=True,
                text=True,
                timeout=30,
                env=stack.engine.env,
            )
            if res.returncode != 0:
                print(
                    f"podman healthcheck run {some.name}: {res.returncode} {res.stdout} {res.stderr}"
                )
            return res.returncode == 0
    else:

        def healthy() -> bool:
            some.reload()
            return bool(some.attrs["State"].get("Health", {}).get("Status") == "healthy")

    poll(f"{some.name}'s health check to pass", 60, healthy, interval=1.0)

    # The cluster's public key, from the one-shot `keys` service.
    keys_log = stack.run("logs", "--no-color", "keys").stdout
    m = re.search(r"gateway public key: ([0-9a-f]{64})", keys_log)
    assert m, keys_log[-2000:]
    gateway_public = m.group(1)

    # A client, registered by exec in the admin service (jvpn as jvpn-admin, over TLS).
    key_file = tmp_path / "alice.key"
    gen = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from jvpn.cli import main; sys.exit(main())",
            "keys",
            "gen",
            "--out",
            str(key_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    client_public = gen.stdout.split()[0]
    stack.run(
        "exec",
        "-T",
        "admin",
        "jvpn",
        "clients",
        "add",
        client_public,
        "--upstream",
        "echo:9000",
        "--name",
        "alice",
    )
    listed = stack.run("exec", "-T", "admin", "jvpn", "clients", "list").stdout
    assert client_public in listed and "alice" in listed

    agent_env = {k: v for k, v in os.environ.items() if not k.startswith("JVPN_")}
    agent_env["PYTHONPATH"] = str(ROOT)
    agents = [
        AgentProcess(
            [
                "--private-key-file",
                str(key_file),
                "--gateway-public-key",
                gateway_public,
                "--gateway",
                f"127.0.0.1:{stack.port}",
                "--upstream",
                "echo:9000",
                "--local-udp",
                "127.0.0.1:0",
                "--status-json",
                "--set",
                "status_interval_s=0.2",
            ],
            agent_env,
        )
        for _ in range(AGENTS)
    ]
    try:

        def attached() -> bool:
            for a in agents:
                if a.proc.poll() is not None:
                    pytest.fail(f"agent exited {a.proc.returncode}:\n" + "\n".join(a.lines))
            return all(a.status.get("state") == "ATTACHED" and a.local for a in agents)

        poll("every agent attached through the balancer", 60, attached)
        for i, a in enumerate(agents):
            assert a.echo(f"before-{i}".encode()), f"agent-{i}: no echo\n" + "\n".join(a.lines)

        nodes = {a.status["node"] for a in agents}
        assert nodes <= set(gateways), f"node ids {nodes} are not the replicas' {set(gateways)}"

        # Kill the replica that holds the most sessions.
        by_node: dict[str, list[AgentProcess]] = {}
        for a in agents:
            by_node.setdefault(a.status["node"], []).append(a)
        victim = max(by_node, key=lambda n: len(by_node[n]))
        moving = {id(a): (a.status["session_id"], a.status["epoch"]) for a in by_node[victim]}
        t_kill = time.monotonic()
        gateways[victim].kill()

        def moved() -> bool:
            for a in agents:
                if a.proc.poll() is not None:
                    pytest.fail(f"agent exited {a.proc.returncode}:\n" + "\n".join(a.lines))
            return all(
                a.status.get("state") == "ATTACHED" and a.status.get("node") != victim
                for a in agents
            )

        poll(f"the sessions on {victim} to move", 60, moved, interval=0.2)
        outages = []
        for a in by_node[victim]:
            sid, epoch = moving[id(a)]
            assert a.status["session_id"] == sid, "the session was replaced, not moved"
            assert a.status["epoch"] > epoch
            first = next(
                t
                for t, st in a.history
                if t > t_kill and st.get("state") == "ATTACHED" and st.get("node") != victim
            )
            outages.append(first - t_kill)
        figure(
            "containers_sessions_moved",
            max(outages),
            "s",
            sessions=len(outages),
            victim=victim,
            median=sorted(outages)[len(outages) // 2],
        )
        for i, a in enumerate(agents):
            assert a.echo(f"after-{i}".encode()), f"agent-{i}: no echo after\n" + "\n".join(a.lines)
        survivors = {a.status["session_id"] for a in agents}
        assert len(survivors) == AGENTS

        # Prometheus no longer scrapes the killed replica: its target is down, or gone once
        # DNS stops naming it (then it is no target at all: see deploy/README.md), and the
        # other two are up.
        dead = f"{ip_of[victim]}:{admin_port}"
        seen: list[str] = []

        def victim_not_up() -> bool:
            t = stack.targets()
            seen.append(t.get(dead, "gone"))
            live = {f"{ip}:{admin_port}" for n, ip in ip_of.items() if n != victim}
            return t.get(dead, "gone") != "up" and all(t.get(x) == "up" for x in live)

        poll("Prometheus to stop scraping the killed replica", 90, victim_not_up)
        print(f"killed replica's target as Prometheus saw it: {seen}")

        # The balancer followed: its entrypoint saw the name resolve to two replicas and
        # reloaded nginx with them.
        survivors_ips = " ".join(
            sorted((ip for n, ip in ip_of.items() if n != victim), key=ipaddress.ip_address)
        )
        poll(
            "nginx to drop the killed replica from its upstreams",
            30,
            lambda: (
                f"-> {survivors_ips}; reloading" in stack.run("logs", "--no-color", "nginx").stdout
            ),
        )

        # A second `up` on the running project (with Podman, docker-compose v1 refuses it
        # unless the file's network matches what Podman reports) brings the replica back:
        # nginx and Prometheus take it in again, and the sessions stay.
        stack.run("up", "-d", "--scale", f"gateway={GATEWAYS}", timeout=300)
        back = {
            n: stack.address(c)
            for n, c in (
                ("gateway-" + re.split(r"[-_]", c.name)[-1], c) for c in stack.containers("gateway")
            )
            if c.attrs["State"]["Running"]
        }
        assert set(back) == set(gateways), back
        every = " ".join(sorted(back.values(), key=ipaddress.ip_address))
        poll(
            "nginx to take the replica in again",
            30,
            lambda: f"-> {every}; reloading" in stack.run("logs", "--no-color", "nginx").stdout,
        )
        want = {f"{ip}:{admin_port}" for ip in back.values()}
        poll(
            "Prometheus to scrape the three replicas again",
            90,
            lambda: (t := stack.targets()) and want <= set(t) and all(t[x] == "up" for x in want),
        )
        for i, a in enumerate(agents):
            assert a.status["session_id"] in survivors and a.status["state"] == "ATTACHED"
            assert a.echo(f"again-{i}".encode()), f"agent-{i}: no echo\n" + "\n".join(a.lines)
    finally:
        for a in agents:
            a.stop()
