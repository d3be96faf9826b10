"""A real two-node Ray cluster on loopback for the sweep tests, started with `ray start`.

Every Ray process gets an environment that keeps its traffic on this machine:

- every process runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and node address
  127.0.0.1 (Ray otherwise swaps in the machine's network address; its servers listen on
  loopback only when their node address is exactly 127.0.0.1);
- the second node joins through ``ray_start_loopback.py``: Ray's own ``ray start``, with
  only its Windows/macOS guard against joining in that mode lifted;
- the dashboard's start-up probe of cloud metadata services goes to a closed loopback
  port (HTTP proxy variables, loopback exempt);
- token authentication is on, with a token file of the test's own;
- each node has its own node-local folder (``MEDSSL_LOCAL_RUNS``, as two machines
  would) and, when given, the settings of the tests' S3 server: the nodes share
  nothing but that store and the tests' temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
LOOPBACK = "127.0.0.1,localhost,::1"
BIN = Path(sys.executable).parent
START_LOOPBACK_NODE = Path(__file__).with_name("ray_start_loopback.py")


def ray_env(tmp: Path, token_path: Path,
            extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(extra or {})
    closed = "http://127.0.0.1:9"
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        http_proxy=closed, HTTP_PROXY=closed, https_proxy=closed, HTTPS_PROXY=closed,
        no_proxy=LOOPBACK, NO_PROXY=LOOPBACK,
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
        TMPDIR=str(tmp),
    )
    return env


@dataclass
class RayCluster:
    gcs_address: str  # HOST:PORT, for --address
    dashboard: str  # http://HOST:PORT, for ray job submit
    env: dict[str, str]  # environment of drivers and CLI calls
    temp_dir: Path  # holds each node's own Ray temp folder
    local_dirs: tuple[Path, Path]  # each node's node-local folder (MEDSSL_LOCAL_RUNS)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def node_ids(self) -> set[str]:
        listed = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        return {node["node_id"] for node in json.loads(listed.stdout)
                if node["state"] == "ALIVE"}


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                return False
    return True


def _port_base() -> int:
    """A base port whose cluster ports (below the ephemeral range) are all free."""
    for base in range(6390, 16390, 500):
        if _ports_free([base, base + 1, base + 2, *range(base + 101, base + 106),
                        *range(base + 111, base + 116), *range(base + 200, base + 400)]):
            return base
    raise RuntimeError("no free port range for a test Ray cluster")


def _node_ports(first: int, workers: int) -> list[str]:
    """One CPU, no GPU, and every port a node opens from the test's range: Ray's defaults
    (the dashboard agent's 52365) would collide with a local instance's. Its five own
    ports from ``first``, worker ports ``workers`` .. ``workers + 99``."""
    return ["--num-cpus", "1", "--num-gpus", "0",
            "--node-manager-port", str(first), "--object-manager-port", str(first + 1),
            "--dashboard-agent-listen-port", str(first + 2),
            "--metrics-export-port", str(first + 3), "--runtime-env-agent-port", str(first + 4),
            "--min-worker-port", str(workers), "--max-worker-port", str(workers + 99),
            "--disable-usage-stats"]


def start_cluster(tmp: Path, extra_env: dict[str, str] | None = None) -> RayCluster:
    port = _port_base()
    dashboard_port = port + 1
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    env = ray_env(tmp, token, extra_env)
    head_temp = tmp / "head"
    local_dirs = (tmp / "head-local", tmp / "node2-local")
    cluster = RayCluster(f"{HOST}:{port}", f"http://{HOST}:{dashboard_port}",
                         {**env, "MEDSSL_LOCAL_RUNS": str(tmp / "driver-local")}, tmp,
                         local_dirs)
    head = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", HOST, "--port", str(port),
         "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
         "--ray-client-server-port", str(port + 2), "--temp-dir", str(head_temp),
         *_node_ports(port + 101, port + 300)],
        env={**env, "MEDSSL_LOCAL_RUNS": str(local_dirs[0])}, capture_output=True, text=True,
        timeout=120)
    assert head.returncode == 0, head.stdout + head.stderr
    worker = subprocess.run(
        [sys.executable, str(START_LOOPBACK_NODE), "start", "--address", cluster.gcs_address,
         "--node-ip-address", HOST, "--temp-dir", str(tmp / "node2"),
         *_node_ports(port + 111, port + 200)],
        env={**env, "MEDSSL_LOCAL_RUNS": str(local_dirs[1])}, capture_output=True, text=True,
        timeout=120)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    return cluster


def stop_cluster(cluster: RayCluster) -> None:
    """Stop this cluster's processes only (``ray stop`` would stop every Ray instance on
    the machine): every process naming the cluster's temp folder, whose end also ends
    the workers its raylets started."""
    import psutil

    named = [p for p in psutil.process_iter(["cmdline"])
             if str(cluster.temp_dir) in " ".join(p.info["cmdline"] or [])]
    # agents and workers rename themselves ("ray::DashboardAgent"): take every descendant
    mine = {p.pid: p for p in named}
    for process in named:
        with contextlib.suppress(psutil.Error):
            mine.update({child.pid: child for child in process.children(recursive=True)})
    mine = list(mine.values())
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
