"""Launch recipes: torchrun commands, the SLURM script, DeepSpeed presets, and a real
two-node torchrun run (two agents on loopback, each acting as one node)."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.cli import main as cluster_main
from cluster.deepspeed_presets import deepspeed_config, micro_batch_size
from cluster.launch import parse_endpoint, parse_nnodes, torchrun_command
from cluster.slurm import SlurmJob, render_sbatch
from tests.launching import (
    check_sbatch_script,
    check_two_rank_run,
    free_port,
    process_tree,
    tiny_pretrain_overrides,
    torchrun,
    worker_env,
)

REPO = Path(__file__).resolve().parents[1]

# Overrides with spaces, quotes and shell metacharacters: they must reach the program as-is.
TRICKY_OVERRIDES = ["run.out=runs/it's a $HOME; `x` run", 'method.name="byol"', "optim.lr=1e-3"]


# --------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize(("nnodes", "expected"), [("1", (1, 1)), (4, (4, 4)), ("2:4", (2, 4)),
                                                  ("3:3", (3, 3))])
def test_parse_nnodes(nnodes: str | int, expected: tuple[int, int]) -> None:
    assert parse_nnodes(nnodes) == expected


@pytest.mark.parametrize("nnodes", ["0", "4:2", "1:2:3", "a", "2:", ":2", "-1", "0:2"])
def test_parse_nnodes_rejects(nnodes: str) -> None:
    with pytest.raises(ValueError, match="nnodes"):
        parse_nnodes(nnodes)


def test_parse_endpoint() -> None:
    assert parse_endpoint("node0.example:29400") == ("node0.example", 29400)
    assert parse_endpoint("[::1]:29400") == ("::1", 29400)
    assert parse_endpoint("node0") == ("node0", None)
    for bad in ("node0:0", "node0:70000", "node0:x", ":29400"):
        with pytest.raises(ValueError, match="endpoint"):
            parse_endpoint(bad)


def test_torchrun_command_options() -> None:
    command = torchrun_command(
        nnodes="2:4", nproc_per_node=8, rdzv_endpoint="node0:29400", run_id="job7",
        config="cfg.yaml", overrides=["run.out=x"], max_restarts=1, monitor_interval=5,
        local_addr="10.0.0.3", rdzv_conf={"join_timeout": 600, "is_host": False})
    assert command == [
        "torchrun", "--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400", "--rdzv-id=job7", "--max-restarts=1",
        "--monitor-interval=5", "--local-addr=10.0.0.3", "--rdzv-conf=join_timeout=600,is_host=0",
        "-m", "pretrain", "--config", "cfg.yaml", "run.out=x",
    ]
    for bad in ({"nnodes": "3:2"}, {"nproc_per_node": 0}, {"max_restarts": -1},
                {"monitor_interval": 0}, {"overrides": ["no-equals"]}):
        kwargs = {"nnodes": "1", "nproc_per_node": 1, "rdzv_endpoint": "h:1", "run_id": "r",
                  "config": None, **bad}
        with pytest.raises(ValueError):
            torchrun_command(**kwargs)  # type: ignore[arg-type]


def test_torchrun_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cluster_main(["torchrun", "--nnodes", "2", "--nproc-per-node", "4",
                         "--rdzv-endpoint", "node0:29400", "--monitor-interval", "2",
                         "run.out=a b"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 "
                           "--nproc-per-node=4 --rdzv-backend=c10d ")
    assert line.endswith("--monitor-interval=2 -m pretrain 'run.out=a b'")
    assert cluster_main(["torchrun", "--nnodes", "4:2"]) == 2
    assert "MIN (4) is larger than MAX (2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cluster_main(["torchrun", "--help"])
    assert "--rdzv-endpoint node0.example:29400" in capsys.readouterr().out


# --------------------------------------------------------------------------- SLURM


def _job(**changes: object) -> SlurmJob:
    fields: dict[str, object] = {
        "nodes": 2, "gpus_per_node": 4, "time": "12:00:00", "partition": "gpu",
        "account": "proj42", "job_name": "byol-acdc", "requeue": True,
        "sbatch_options": ("--constraint=h100",), "setup": ("echo set-up ran",),
        "config": "configs/my cfg.yaml", "overrides": tuple(TRICKY_OVERRIDES),
    }
    return SlurmJob(**{**fields, **changes})  # type: ignore[arg-type]


def test_slurm_script_directives_and_syntax(tmp_path: Path) -> None:
    script = render_sbatch(_job())
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=byol-acdc", "--nodes=2", "--ntasks-per-node=1",
                      "--gpus-per-node=4", "--cpus-per-task=32", "--time=12:00:00",
                      "--partition=gpu", "--account=proj42", "--output=%x-%j.out",
                      "--requeue", "--constraint=h100"):
        assert f"#SBATCH {directive}" in lines
    check_sbatch_script(script, tmp_path)
    plain = render_sbatch(_job(partition=None, account=None, requeue=False,
                               sbatch_options=(), setup=()))
    assert "--partition" not in plain and "--account" not in plain and "--requeue" not in plain


def test_slurm_script_runs_srun_torchrun(tmp_path: Path) -> None:
    """Run the script under bash with stand-ins for scontrol and srun: the exact argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$ARGV_FILE"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(_job(monitor_interval=5)))
    env = {k: v for k, v in os.environ.items() if k != "MEDSSL_RDZV_PORT"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", ARGV_FILE=str(tmp_path / "argv"),
               SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="32")
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    assert "set-up ran" in result.stdout
    assert "rendezvous at gpu-node-07:29400" in result.stdout
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == [
        "--kill-on-bad-exit=1", "--cpus-per-task=32", "torchrun",
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-node-07:29400", "--rdzv-id=4242", "--max-restarts=3",
        "--monitor-interval=5", "-m", "pretrain", "--config", "configs/my cfg.yaml",
        *TRICKY_OVERRIDES,
    ]


@pytest.mark.parametrize(("changes", "message"), [
    ({"nodes": 0}, "nodes must be a positive integer"),
    ({"gpus_per_node": -2}, "gpus_per_node must be a positive integer"),
    ({"cpus_per_task": 0}, "cpus_per_task"),
    ({"time": "12h"}, "HH:MM:SS"),
    ({"time": "1:75:00"}, "< 60"),
    ({"time": "00:00:00"}, "longer than zero"),
    ({"job_name": "my job"}, "job name"),
    ({"partition": "gpu;rm"}, "partition"),
    ({"log": "logs/my log.out"}, "log path"),
    ({"port": 0}, "port"),
    ({"max_restarts": -1}, "max_restarts"),
    ({"sbatch_options": ("mem=0",)}, "sbatch option"),
    ({"overrides": ("lr 0.1",)}, "key.sub=value"),
])
def test_slurm_job_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _job(**changes)


def test_slurm_cli_writes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scripts" / "pretrain.sbatch"
    assert cluster_main(["slurm", "--nodes", "3", "--gpus-per-node", "8", "--time",
                         "1-00:00:00", "--job-name", "j", "--out", str(out),
                         "--config", "cfg.yaml", "run.out=runs/x"]) == 0
    script = out.read_text()
    assert "#SBATCH --nodes=3" in script and "#SBATCH --time=1-00:00:00" in script
    assert "-m pretrain --config cfg.yaml run.out=runs/x" in script
    assert capsys.readouterr().out == ""
    assert cluster_main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time",
                         "25:00"]) == 2
    assert "HH:MM:SS" in capsys.readouterr().err


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_presets() -> None:
    config = deepspeed_config(2, micro_batch=32, grad_accum=4, bf16=True, gradient_clipping=1.0)
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 2
    assert config["torch_autocast"]["dtype"] == "bfloat16"
    assert config["gradient_clipping"] == 1.0
    assert "train_batch_size" not in config  # DeepSpeed derives it from the world size
    assert "optimizer" not in config and "scheduler" not in config  # medssl brings its own
    fp32 = deepspeed_config(0, 8, 1, bf16=False)
    assert "torch_autocast" not in fp32 and "bf16" not in fp32
    assert fp32["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 by default
    assert micro_batch_size(1024, world_size=16, grad_accum=2) == 32
    with pytest.raises(ValueError, match="divisible"):
        micro_batch_size(100, world_size=16)
    for bad in ({"stage": 3}, {"micro_batch": 0}, {"grad_accum": 0}):
        with pytest.raises(ValueError):
            deepspeed_config(**{"stage": 1, "micro_batch": 8, "grad_accum": 1, "bf16": True,
                                **bad})  # type: ignore[arg-type]


DEEPSPEED_CHECK = textwrap.dedent("""
    import json
    from cluster.deepspeed_presets import check_deepspeed_config, deepspeed_config
    results = []
    for stage in (0, 1, 2):
        for bf16 in (True, False):
            parsed = check_deepspeed_config(
                deepspeed_config(stage, 16, 2, bf16, gradient_clipping=1.0))
            results.append([stage, bf16, parsed.zero_optimization_stage,
                            parsed.train_batch_size, parsed.gradient_accumulation_steps,
                            bool(parsed.torch_autocast_enabled), parsed.gradient_clipping])
    print("RESULTS" + json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed")
def test_deepspeed_presets_parse_with_deepspeed() -> None:
    """DeepSpeed's own parser accepts every preset (in a subprocess: importing DeepSpeed
    picks an accelerator and configures logging for the whole process)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_CHECK], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))
    rows = json.loads(line.removeprefix("RESULTS"))
    # no process group: DeepSpeed assumes a world of one, so train batch = 16 x 2
    assert rows == [[stage, bf16, stage, 32, 2, bf16, 1.0]
                    for stage in (0, 1, 2) for bf16 in (True, False)]


# --------------------------------------------------------------------------- two nodes

# torchrun, except that every TCPStore *server* the agent starts listens on 127.0.0.1 only.
# torch's TCPStore server always binds the wildcard address ("::", else "0.0.0.0"), whatever
# host name it is given; the one supported way to choose the address is ``master_listen_fd``,
# a socket bound beforehand, which torchrun does not expose. The agent creates two servers:
# the c10d rendezvous store (on the endpoint's port) and, on the rank-0 node, the store its
# workers share (MASTER_ADDR/MASTER_PORT). Workers only connect as clients.
def _decode_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def _listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.add(_decode_address(fields[1]))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_two_node_torchrun_pretraining(prepared: Path, tmp_path: Path) -> None:
    """Two torchrun agents, each one node with one process, meet at a c10d rendezvous on
    127.0.0.1 and pretrain together; every server listens on loopback only."""
    out = tmp_path / "run"  # one run directory, as on a shared cluster file system
    port = free_port()
    overrides = tiny_pretrain_overrides(prepared, out)
    env = worker_env()
    agents, logs = [], []
    for node, is_host in enumerate((True, False)):
        command = torchrun_command(
            nnodes="2", nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{port}",
            run_id="two-node-test", config=None, overrides=overrides, max_restarts=0,
            monitor_interval=0.2, local_addr="127.0.0.1",
            rdzv_conf={"is_host": is_host, "join_timeout": 90})
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        with log.open("w") as handle:
            agents.append(subprocess.Popen(
                torchrun(*command[1:]), env=env, cwd=REPO,
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True))

    listeners: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 300
    try:
        while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
            listeners |= _listening_sockets(process_tree({agent.pid for agent in agents}))
            time.sleep(0.25)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    report = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert [agent.returncode for agent in agents] == [0, 0], report

    assert ("127.0.0.1", port) in listeners, listeners  # the check saw the rendezvous store
    assert all(_is_loopback(address) for address, _ in listeners), listeners

    check_two_rank_run(out)
