"""Ray cluster recipes: the SLURM script (``ray symmetric-run`` + the sweep as driver) and
the on-premise cluster-launcher YAML. Ray's own click commands, schema and config
preparation judge what is generated; nothing connects anywhere or starts Ray."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main as cluster_main
from cluster.ray_cluster import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_RAY_PORT,
    RayClusterSpec,
    check_cluster_config,
    cluster_config,
    parse_file_mount,
    render_cluster_yaml,
)
from cluster.ray_slurm import RaySweepJob, render_ray_sbatch, sweep_arguments
from tests.launching import check_sbatch_script

# Overrides with spaces, quotes and shell metacharacters: they must reach the sweep as-is.
TRICKY_OVERRIDES = ["out=runs/it's a $HOME; `x` sweep", 'name="acdc"', "seeds=[0,1]"]
CONFIG = "configs/my sweep.yaml"


def test_default_ports_are_rays() -> None:
    from ray._private import ray_constants

    assert DEFAULT_RAY_PORT == ray_constants.DEFAULT_PORT
    assert DEFAULT_DASHBOARD_PORT == ray_constants.DEFAULT_DASHBOARD_PORT


# --------------------------------------------------------------------------- SLURM


def _job(**changes: object) -> RaySweepJob:
    fields: dict[str, object] = {
        "nodes": 2, "gpus_per_node": 4, "time": "12:00:00", "partition": "gpu",
        "account": "proj42", "job_name": "sweep-acdc", "sbatch_options": ("--constraint=h100",),
        "setup": ("echo set-up ran",), "config": CONFIG, "overrides": tuple(TRICKY_OVERRIDES),
    }
    return RaySweepJob(**{**fields, **changes})  # type: ignore[arg-type]


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def test_ray_slurm_directives_and_syntax(tmp_path: Path) -> None:
    script = render_ray_sbatch(_job())
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert _directives(script) == [
        "--job-name=sweep-acdc", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
        "--cpus-per-task=32", "--time=12:00:00", "--output=%x-%j.out", "--partition=gpu",
        "--account=proj42", "--exclusive", "--constraint=h100"]
    check_sbatch_script(script, tmp_path)
    plain = _directives(render_ray_sbatch(_job(partition=None, account=None, exclusive=False,
                                               sbatch_options=(), cpus_per_task=12)))
    assert plain == ["--job-name=sweep-acdc", "--nodes=2", "--ntasks-per-node=1",
                     "--gpus-per-node=4", "--cpus-per-task=12", "--time=12:00:00",
                     "--output=%x-%j.out"]
    # the template documents token authentication and the loopback-only job API
    for phrase in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token --generate",
                   "must not be", "reachable by others", "--dashboard-host=127.0.0.1"):
        assert phrase in script


def _fake_tools(tmp_path: Path, getent_output: str = "10.0.0.7 STREAM gpu-node-07\n"
                "10.0.0.7 DGRAM\n") -> Path:
    """Stand-ins for scontrol, getent and srun; srun records its argv and Ray's variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "scontrol": "#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n",
        "getent": f"#!/bin/sh\nprintf %s {shlex.quote(getent_output)}\n",
        "srun": '#!/bin/sh\nprintf \'%s\\0\' "$@" > "$ARGV_FILE"\n'
                'printf \'%s\\n\' "mode=${RAY_AUTH_MODE-}" "token=${RAY_AUTH_TOKEN-}" '
                '"path=${RAY_AUTH_TOKEN_PATH-}" "address=${RAY_ADDRESS-unset}" '
                '"timeout=${RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT-}" > "$ENV_FILE"\n',
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # the token is made with `python -c`
    return bin_dir


def _run_script(tmp_path: Path, script_text: str, bin_dir: Path,
                **env_changes: str) -> tuple[subprocess.CompletedProcess[str], list[str],
                                             dict[str, str]]:
    script = tmp_path / "job.sbatch"
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MEDSSL_RAY_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", ARGV_FILE=str(tmp_path / "argv"),
               ENV_FILE=str(tmp_path / "env"), SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="32",
               RAY_ADDRESS="10.9.9.9:6379", **env_changes)
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    argv, seen = [], {}
    if result.returncode == 0:
        argv = (tmp_path / "argv").read_text().split("\0")[:-1]
        seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    return result, argv, seen


def test_ray_slurm_runs_symmetric_run_with_the_allocation(tmp_path: Path) -> None:
    """Run the script under bash with stand-ins; parse what reaches srun with Ray's own
    click commands, the way symmetric-run hands it to `ray start` on head and workers."""
    from ray.scripts.scripts import start
    from ray.scripts.symmetric_run import curate_and_validate_ray_start_args, symmetric_run

    from finetune.cli import build_parser as finetune_parser

    result, argv, seen = _run_script(tmp_path, render_ray_sbatch(_job()), _fake_tools(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "set-up ran" in result.stdout
    assert "Ray head at 10.0.0.7:6379 (gpu-node-07)" in result.stdout

    ray_at = argv.index("ray")
    assert argv[:ray_at] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                             "--cpus-per-task=32"]
    assert argv[ray_at + 1] == "symmetric-run"
    options = argv[ray_at + 2:]
    separator = options.index("--")
    before, entrypoint = options[:separator], options[separator + 1:]

    params = symmetric_run.make_context("symmetric-run", list(options)).params
    assert params["address"] == "10.0.0.7:6379"
    assert params["min_nodes"] == 2
    ray_args = curate_and_validate_ray_start_args(before)  # no --head/--port/--block
    head = start.make_context("start", ["--head", "--node-ip-address=10.0.0.7",
                                        "--port=6379", *ray_args]).params
    worker = start.make_context("start", ["--address", "10.0.0.7:6379", "--block",
                                          *ray_args]).params
    for node in (head, worker):
        assert node["num_cpus"] == 32  # the allocation: --cpus-per-task
        assert node["num_gpus"] == 4  # the allocation: --gpus-per-node
        assert node["dashboard_host"] == "127.0.0.1"
        assert node["dashboard_port"] == DEFAULT_DASHBOARD_PORT
    assert head["port"] == 6379
    # `ray start` refuses head-only flags on a worker
    assert worker["port"] is None and worker["include_dashboard"] is None

    assert entrypoint == ["python", "-m", "finetune", "sweep", "--address", "auto",
                          "--config", CONFIG, *TRICKY_OVERRIDES]
    sweep = finetune_parser().parse_args(entrypoint[3:])
    assert (sweep.command, sweep.address, sweep.config) == ("sweep", "auto", CONFIG)
    assert sweep.overrides == TRICKY_OVERRIDES

    # token auth on, with a fresh 256-bit token in the environment srun passes on, never
    # in the log; an inherited RAY_ADDRESS is dropped
    assert seen["mode"] == "token"
    assert len(seen["token"]) == 64 and int(seen["token"], 16) >= 0
    assert seen["token"] not in result.stdout + result.stderr
    assert seen["address"] == "unset"
    assert seen["timeout"] == "300"


def test_ray_slurm_environment_overrides(tmp_path: Path) -> None:
    bin_dir = _fake_tools(tmp_path)
    text = render_ray_sbatch(_job(port=6390, dashboard_port=8300))
    result, argv, seen = _run_script(
        tmp_path, text, bin_dir, MEDSSL_RAY_HEAD_IP="192.168.5.1", MEDSSL_RAY_PORT="6400",
        RAY_AUTH_TOKEN_PATH="/home/me/.ray/auth_token")
    assert result.returncode == 0, result.stderr
    assert "--address=192.168.5.1:6400" in argv
    assert "--dashboard-port=8300" in argv
    assert seen["token"] == "" and seen["path"] == "/home/me/.ray/auth_token"
    result, argv, seen = _run_script(tmp_path, text, bin_dir, RAY_AUTH_MODE="disabled")
    assert result.returncode == 0, result.stderr
    assert "--address=10.0.0.7:6390" in argv
    assert seen["mode"] == "disabled" and seen["token"] == ""


def test_ray_slurm_refuses_a_loopback_head(tmp_path: Path) -> None:
    bin_dir = _fake_tools(tmp_path, getent_output="127.0.1.1 STREAM gpu-node-07\n")
    result, _, _ = _run_script(tmp_path, render_ray_sbatch(_job()), bin_dir)
    assert result.returncode == 1
    assert "no network address for gpu-node-07" in result.stderr
    assert "MEDSSL_RAY_HEAD_IP" in result.stderr
    assert not (tmp_path / "argv").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"nodes": -1}, "nodes must be a positive integer"),
    ({"gpus_per_node": 0}, "gpus_per_node must be a positive integer"),
    ({"cpus_per_task": 0}, "cpus_per_task"),
    ({"time": "12h"}, "HH:MM:SS"),
    ({"time": "0:00:00"}, "longer than zero"),
    ({"job_name": "my job"}, "job name"),
    ({"account": "a;b"}, "account"),
    ({"log": "logs/my log.out"}, "log path"),
    ({"port": 70000}, "port must be 1..65535"),
    ({"dashboard_port": 0}, "dashboard port"),
    ({"dashboard_port": 6379}, "must differ"),
    ({"sbatch_options": ("exclusive",)}, "sbatch option"),
    ({"setup": ("echo a\necho b",)}, "one line"),
    ({"overrides": ("lr 0.1",)}, "key.sub=value"),
    ({"config": ""}, "sweep config"),
])
def test_ray_slurm_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _job(**changes)


def test_sweep_arguments() -> None:
    assert sweep_arguments("s.yaml", ["a.b=1"]) == [
        "python", "-m", "finetune", "sweep", "--address", "auto", "--config", "s.yaml", "a.b=1"]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Bad input on the command line: exit status 2 and exactly one `error:` line."""
    assert cluster_main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


RAY_SLURM = ["ray-slurm", "--gpus-per-node", "8", "--config", "sweep.yaml"]


@pytest.mark.parametrize(("argv", "message"), [
    ([*RAY_SLURM, "--nodes", "-2", "--time", "1:00:00"], "nodes must be a positive integer"),
    ([*RAY_SLURM, "--nodes", "2", "--time", "90 minutes"], "HH:MM:SS"),
    ([*RAY_SLURM, "--nodes", "2", "--time", "1:00:00", "--setup", "module load x\nrm -rf y"],
     "one line"),
    ([*RAY_SLURM, "--nodes", "2", "--time", "1:00:00", "bad-override"], "key.sub=value"),
])
def test_ray_slurm_cli_errors(argv: list[str], message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(argv, capsys)
    assert line.startswith("error: ") and message in line


def test_ray_slurm_cli_writes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scripts" / "sweep.sbatch"
    assert cluster_main(["ray-slurm", "--nodes", "3", "--gpus-per-node", "8", "--time",
                         "1-00:00:00", "--cpus-per-task", "96", "--sbatch=--mem=0",
                         "--setup", "source .venv/bin/activate", "--out", str(out),
                         "--config", "sweep.yaml", "out=runs/a b"]) == 0
    script = out.read_text()
    assert {"--nodes=3", "--time=1-00:00:00", "--cpus-per-task=96", "--mem=0",
            "--exclusive"} <= set(_directives(script))
    assert ("-- python -m finetune sweep --address auto --config sweep.yaml 'out=runs/a b'"
            in script)
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        cluster_main(["ray-slurm", "--help"])
    assert "sbatch sweep.sbatch" in capsys.readouterr().out


# --------------------------------------------------------------------------- on-premise


def _spec(**changes: object) -> RayClusterSpec:
    fields: dict[str, object] = {
        "head_ip": "10.0.0.1", "worker_ips": ("10.0.0.2", "10.0.0.3"), "ssh_user": "alice",
        "ssh_private_key": "~/.ssh/id_ed25519", "num_cpus": 64, "num_gpus": 8,
        "activate": "source /shared/medssl/.venv/bin/activate",
        "setup": ("pip install -e /shared/medssl",), "file_mounts": (("~/data", "/data/acdc"),),
    }
    return RayClusterSpec(**{**fields, **changes})  # type: ignore[arg-type]


def _ray_start_params(command: str) -> dict[str, object]:
    """The `ray start` part of a launcher command, parsed by Ray's own click command."""
    from ray.scripts.scripts import start

    words = shlex.split(command)
    assert words[:2] == ["ray", "start"], command
    return start.make_context("start", words[2:]).params


def test_ray_cluster_yaml_is_valid_for_ray() -> None:
    text = render_cluster_yaml(_spec())
    config = yaml.safe_load(text)
    assert config == cluster_config(_spec())
    assert config["provider"] == {"type": "local", "head_ip": "10.0.0.1",
                                  "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    assert config["auth"] == {"ssh_user": "alice", "ssh_private_key": "~/.ssh/id_ed25519"}
    assert config["setup_commands"] == ["pip install -e /shared/medssl"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token",
                                     "~/data": "/data/acdc"}

    activate = "source /shared/medssl/.venv/bin/activate && "
    head_stop, head_start = config["head_start_ray_commands"]
    worker_stop, worker_start = config["worker_start_ray_commands"]
    assert head_stop == worker_stop == activate + "ray stop"
    assert head_start.startswith(
        activate + "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=127.0.0.1 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml")
    assert worker_start.startswith(
        activate + "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379")
    head = _ray_start_params(head_start.removeprefix(activate + "RAY_AUTH_MODE=token "))
    worker = _ray_start_params(worker_start.removeprefix(activate + "RAY_AUTH_MODE=token "))
    assert head["head"] and head["port"] == 6379 and head["dashboard_host"] == "127.0.0.1"
    assert head["dashboard_port"] == 8265
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert worker["address"] == "$RAY_HEAD_IP:6379" and worker["port"] is None
    for node in (head, worker):
        assert (node["num_cpus"], node["num_gpus"]) == (64, 8)

    prepared = check_cluster_config(config)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert (node_type["min_workers"], node_type["max_workers"]) == (2, 2)
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    assert prepared["head_setup_commands"] == ["pip install -e /shared/medssl"]
    assert text.startswith("# medssl: a Ray cluster")
    for phrase in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token --generate",
                   "must not be reachable by others"):
        assert phrase in text


def test_ray_cluster_minimal_spec() -> None:
    config = cluster_config(RayClusterSpec(head_ip="head.example", worker_ips=(),
                                           ssh_user="bob"))
    assert config["auth"] == {"ssh_user": "bob"}
    assert config["max_workers"] == 0
    assert config["head_start_ray_commands"][1].endswith(
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-port=8265")
    assert config["worker_start_ray_commands"] == [
        "ray stop", "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379"]
    check_cluster_config(config)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(max_workers=-1), "max_workers"),
    (lambda c: c["provider"].update(worker_ips="10.0.0.2"), "provider/worker_ips"),
    (lambda c: c.update(head_start_commands=["ray start --head"]), "head_start_commands"),
    (lambda c: c["auth"].update(ssh_password="hunter2"), "ssh_password"),
    (lambda c: c.update(head_start_ray_commands="ray start --head"), "head_start_ray_commands"),
    (lambda c: c.update(head_node_type="gpu", available_node_types={
        "gpu": {"node_config": {}, "resources": {"GPU": 8}, "max_workers": 1}}),
     "available_node_types is not supported for on-premise"),
])
def test_ray_cluster_check_rejects(change: Callable[[dict[str, Any]], None],
                                   message: str) -> None:
    config = cluster_config(_spec())
    change(config)
    with pytest.raises(ValueError, match=message):
        check_cluster_config(config)


@pytest.mark.parametrize(("changes", "message"), [
    ({"head_ip": "10.0.0.300"}, "head IP"),
    ({"worker_ips": ("10.0.0.2", "bad host")}, "worker IP"),
    ({"worker_ips": ("10.0.0.2", "10.0.0.1")}, "must all differ"),
    ({"ssh_user": "alice;rm"}, "ssh user"),
    ({"cluster_name": "my cluster"}, "cluster name"),
    ({"num_cpus": 0}, "num_cpus"),
    ({"num_gpus": -1}, "num_gpus"),
    ({"port": 0}, "port"),
    ({"dashboard_port": 6379}, "must differ"),
    ({"setup": ("a\nb",)}, "one non-empty line"),
    ({"activate": "source x\nrm y"}, "activate"),
])
def test_ray_cluster_spec_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _spec(**changes)


def test_parse_file_mount() -> None:
    assert parse_file_mount("~/data=/srv/data") == ("~/data", "/srv/data")
    for bad in ("~/data", "=/srv", "~/data="):
        with pytest.raises(ValueError, match="REMOTE_PATH=LOCAL_PATH"):
            parse_file_mount(bad)


def test_ray_cluster_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token yet
    out = tmp_path / "cluster.yaml"
    assert cluster_main(["ray-cluster", "--head-ip", "10.0.0.1", "--worker-ip", "10.0.0.2",
                         "--ssh-user", "alice", "--num-gpus", "8", "--file-mount",
                         "~/data=/data/acdc", "--setup", "nvidia-smi", "--check",
                         "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ray get-auth-token --generate" in captured.err
    config = yaml.safe_load(out.read_text())
    check_cluster_config(config)
    assert config["worker_start_ray_commands"][1] == (
        "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379 --num-gpus=8")

    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("0" * 64)
    assert cluster_main(["ray-cluster", "--head-ip", "10.0.0.1", "--ssh-user", "alice"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert yaml.safe_load(captured.out)["provider"]["worker_ips"] == []

    line = _cli_error(["ray-cluster", "--head-ip", "10.0.0.1", "--worker-ip", "10.0.0.1",
                       "--ssh-user", "alice"], capsys)
    assert line.startswith("error: ") and "must all differ" in line
    line = _cli_error(["ray-cluster", "--head-ip", "10.0.0.1", "--ssh-user", "alice",
                       "--file-mount", "nowhere"], capsys)
    assert "REMOTE_PATH=LOCAL_PATH" in line
