"""A real multi-node Ray cluster on this one machine, for the cluster tests and the backlog benchmark.

`ray start --head` with no CPUs (it holds the GCS and Serve's controller; the service's driver joins it) and
`ray start --address=...` worker nodes, each node with its own ports, worker-port range and a resource label
(`triage-node-<n>`), all with token authentication (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token).
Only the processes started here are ever stopped, by their process IDs: `ray stop` would end every Ray process
on the machine, other sessions' included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_PORTS_PER_NODE = 9
_WORKER_PORTS = 60


def _ray_cli() -> str:
    """The `ray` command of the interpreter running the tests (the venv's)."""
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range(count: int, start: int) -> int:
    """The first port at or after `start` of `count` consecutive free ports."""
    port = start
    while port + count < 65000:
        if all(_port_free(p) for p in range(port, port + count)):
            return port
        port += count
    raise RuntimeError("no free port range for a Ray node")


def auth_env() -> dict[str, str]:
    """The environment every node and driver of the cluster needs: token authentication, with a token made once."""
    env = {"RAY_AUTH_MODE": "token"}
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        subprocess.run([_ray_cli(), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60,
                       env={**os.environ, **env})  # fmt: skip
    return env


@dataclass
class RayNode:
    """One `ray start --block` process and what identifies it."""

    label: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    node_id: str = ""

    def raylet(self) -> psutil.Process | None:
        """The node's raylet process (a child of the `ray start` process)."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "raylet" in child.name() or any("raylet" in part for part in child.cmdline()[:1]):
                        return child
        return None

    def processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return []


@dataclass
class RayCluster:
    """A head node and worker nodes; `address` is what TRIAGE_RAY__ADDRESS takes."""

    temp_dir: Path
    port_base: int = 0
    nodes: list[RayNode] = field(default_factory=list)
    address: str = ""
    _next_port: int = 0

    @property
    def env(self) -> dict[str, str]:
        """Environment for a driver (the service) joining the cluster."""
        return {**auth_env(), "TRIAGE_RAY__ADDRESS": self.address}

    def _ports(self) -> list[str]:
        base = _free_range(_PORTS_PER_NODE + _WORKER_PORTS, self._next_port)
        self._next_port = base + _PORTS_PER_NODE + _WORKER_PORTS
        names = [
            "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        ]  # fmt: skip
        args = [arg for i, name in enumerate(names) for arg in (name, str(base + i))]
        first, last = base + _PORTS_PER_NODE, base + _PORTS_PER_NODE + _WORKER_PORTS - 1
        return [*args, "--min-worker-port", str(first), "--max-worker-port", str(last)]

    def _start(self, label: str, args: list[str], resources: str) -> RayNode:
        log_path = self.temp_dir / f"{label}.log"
        command = [_ray_cli(), "start", "--block", "--disable-usage-stats", *args, *self._ports(),
                   "--resources", resources]  # fmt: skip
        env = {**os.environ, **auth_env()}
        env.pop("RAY_ADDRESS", None)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = RayNode(label, proc, log_path)
        self.nodes.append(node)
        return node

    def start_head(self) -> RayNode:
        """A head node without CPUs for tasks: the GCS, Serve's controller and the drivers' node."""
        gcs_port = _free_range(1, self.port_base or 26379)
        client_port = _free_range(1, gcs_port + 1)
        self._next_port = max(self._next_port, client_port + 1)
        head = self._start(
            "head",
            ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--ray-client-server-port",
             str(client_port), "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false",
             "--temp-dir", str(self.temp_dir / "ray"), "--object-store-memory", str(500 * 2**20)],
            '{"triage-node-head": 1}',
        )  # fmt: skip
        self.address = f"127.0.0.1:{gcs_port}"
        self._wait_for_nodes(1, head)
        return head

    def add_worker(self, num_cpus: int = 1) -> RayNode:
        """A worker node with `num_cpus` CPUs, labelled `triage-node-<n>`."""
        label = f"worker-{len(self.nodes)}"
        node = self._start(
            label,
            ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
             "--num-gpus", "0", "--object-store-memory", str(1024 * 2**20)],
            f'{{"triage-node-{label}": 1}}',
        )  # fmt: skip
        self._wait_for_nodes(len(self.nodes), node)
        return node

    def _alive_nodes(self) -> dict[str, str]:
        """node ID -> the label resource of each alive node, from `ray list nodes` (no driver in this process)."""
        result = subprocess.run(
            [sys.executable, "-c", _LIST_NODES, self.address],
            capture_output=True, text=True, timeout=120, env={**os.environ, **auth_env()},
        )  # fmt: skip
        found = {}
        for line in result.stdout.splitlines():
            match = re.fullmatch(r"NODE (\w+) (\S+)", line.strip())
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def _wait_for_nodes(self, count: int, node: RayNode, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start {node.label} exited:\n{node.log_path.read_text()[-3000:]}")
            alive = self._alive_nodes()
            for node_id, label in alive.items():
                for known in self.nodes:
                    if label == f"triage-node-{known.label}":
                        known.node_id = node_id
            if len(alive) >= count and node.node_id:
                return
            time.sleep(1)
        raise RuntimeError(f"node {node.label} did not join in {timeout_s} s:\n{node.log_path.read_text()[-3000:]}")

    def kill_raylet(self, node: RayNode) -> int:
        """SIGKILL the node's raylet (the node is lost to the cluster); returns its PID."""
        raylet = node.raylet()
        if raylet is None:
            raise RuntimeError(f"no raylet found for {node.label}")
        raylet.send_signal(signal.SIGKILL)
        return raylet.pid

    def stop_node(self, node: RayNode) -> None:
        procs = node.processes()
        for proc in reversed(procs):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        # Workers of this node that outlived it (their raylet killed) are this cluster's too.
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if any(str(self.temp_dir) in part for part in proc.info["cmdline"] or []):
                    proc.kill()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)


_LIST_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
for n in ray.nodes():
    if n["Alive"]:
        labels = [k for k in n["Resources"] if k.startswith("triage-node-")]
        print("NODE", n["NodeID"], labels[0] if labels else "-")
"""


@contextlib.contextmanager
def ray_cluster(workers: int = 2, cpus_per_worker: int = 1):  # type: ignore[no-untyped-def]
    """A head node plus `workers` worker nodes; stopped (only these processes) on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = RayCluster(temp_dir)
    try:
        cluster.start_head()
        for _ in range(workers):
            cluster.add_worker(cpus_per_worker)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
