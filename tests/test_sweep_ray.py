"""Sweeps on a real two-node Ray cluster (loopback): job submission, crashes, retries.

One cluster (a head and a second node, one CPU each; conftest's session fixture
``cluster``) serves every test here; see ``ray_cluster.py`` for how it stays on loopback.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from cluster.storage import join
from cluster.storage.objects import list_files, read_bytes
from finetune.grid import run_grid
from finetune.run_metrics import read_run_metrics
from finetune.sweep_config import load_sweep_config, plan_trials, trial_config
from finetune.train import read_starts
from tests.ray_cluster import RayCluster
from tests.s3_support import S3Server, upload_tree

pytestmark = pytest.mark.slow
BASE = {"arch": "resnet18", "epochs": 2, "batch_size": 8, "epoch_samples": 16, "lr": 0.002,
        "overlays": 0, "device": "cpu"}


def _write_config(folder: Path, **keys: object) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def _sweep(cluster: RayCluster, config: Path, *extra: str, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune", "sweep", "--config", str(config),
         "--address", cluster.gcs_address, *extra],
        env=env or cluster.env, capture_output=True, text=True, timeout=timeout,
        cwd=config.parent)


def _job(cluster: RayCluster, project: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``ray job submit`` of the sweep in ``project``, its driver under a shell of its own
    (as a user's entrypoint script would run it; Ray quotes each argument)."""
    for _ in range(30):  # a fresh head's job agent may not be up yet: Ray says try again
        job = cluster.ray("job", "submit", "--address", cluster.dashboard, *options,
                          "--working-dir", str(project), "--", "bash", "-c",
                          f"{sys.executable} -m finetune sweep --config sweep.yaml; exit $?",
                          timeout=400)
        if "No available agent to submit job" not in job.stderr + job.stdout:
            return job
        time.sleep(1)
    return job


def _job_shell() -> tuple[psutil.Process, psutil.Process]:
    """The submitted job's shell and the sweep driver it runs."""
    shells = [p for p in psutil.process_iter(["name", "cmdline"])
              if p.info["name"] == "bash" and "finetune sweep" in " ".join(
                  p.info["cmdline"] or [])]
    assert len(shells) == 1, shells
    drivers = shells[0].children()
    assert len(drivers) == 1, drivers
    return shells[0], drivers[0]


@dataclass
class Submitted:
    sweep: str  # the sweep's URL
    output: str  # the console of the job that finished it
    done_before: set[str]  # run folders complete when the first job's shell was killed


@pytest.fixture(scope="module")
def submitted(cluster: RayCluster, prepared: Path, pretrain_run: Path, s3: S3Server,
              tmp_path_factory: pytest.TempPathFactory) -> Submitted:
    """A 2 inits x 2 budgets sweep submitted with `ray job submit` on nodes that share
    nothing but the object store: the dataset, the encoder and the sweep live there. Four
    one-CPU trials, so each of the two one-CPU nodes must run some. The first job's shell
    is killed mid-sweep (a second driver started meanwhile must not join in), every
    node-local folder is wiped, and the job is submitted again, as a user would; with
    max_failures 0, so that any retry Tune's bookkeeping cost would fail a trial."""
    work = tmp_path_factory.mktemp("job")
    (work / "project").mkdir()
    bucket = s3.new_bucket()
    data = upload_tree(prepared, join(bucket, "data", "phantom"))
    export = upload_tree(pretrain_run / "export", join(bucket, "pretrain", "byol", "export"))
    config = _write_config(
        work / "project", name="tiny", storage=join(bucket, "sweeps"), data=data, base=BASE,
        inits={"random": "random", "ssl": export}, budgets=[4, 8], seeds=[0],
        resources={"cpu": 1}, max_failures=0, lease_s=2)
    sweep = join(bucket, "sweeps", "tiny")
    first = _job(cluster, config.parent, "--no-wait")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    # trials are training (in their nodes' local copies of their run folders)
    _wait_for(lambda: any(any(d.rglob("starts.jsonl")) for d in cluster.local_dirs), 300)
    # a second driver while the job runs: it waits, then stops naming the holder
    second = _sweep(cluster, config, timeout=60)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert "driven by" in second.stdout and "Ray job raysubmit_" in second.stdout
    refusal = second.stderr.strip().splitlines()[-1]
    assert refusal.startswith("error: ") and "held by" in refusal and "raysubmit_" in refusal
    # the job's shell dies: its orphaned driver stops by itself within seconds
    shell, driver = _job_shell()
    shell.kill()
    gone, alive = psutil.wait_procs([driver], timeout=10)
    assert gone and not alive, "the orphaned driver kept running"
    done_before = set(_finished(sweep))
    assert len(done_before) < 4, "the sweep finished before its job could be killed"
    for folder in (*cluster.local_dirs, Path(cluster.env["MEDSSL_LOCAL_RUNS"])):
        shutil.rmtree(folder, ignore_errors=True)  # every node starts with an empty disk
    job = _job(cluster, config.parent)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "driven by" in job.stdout  # it waited for the dead driver's lease to lapse
    return Submitted(sweep, job.stdout, done_before)


def _finished(sweep: str) -> list[str]:
    """The sweep's run folders whose metrics in the store say complete."""
    return [join(sweep, "runs", name.rsplit("/", 1)[0])
            for name in list_files(join(sweep, "runs")) if name.endswith("metrics.json")
            and read_run_metrics(join(sweep, "runs", name)).complete]


def _table(url: str) -> pd.DataFrame:
    data = io.BytesIO(read_bytes(url))
    return pd.read_parquet(data) if url.endswith(".parquet") else pd.read_csv(data)


def test_job_submit_runs_every_trial_on_both_nodes(cluster: RayCluster,
                                                   submitted: Submitted,
                                                   tmp_path: Path) -> None:
    sweep, output, done_before = submitted.sweep, submitted.output, submitted.done_before
    assert "succeeded" in output
    for noise in ("Could not fetch metrics", "Trials did not complete", "Traceback"):
        assert noise not in output, output[-4000:]
    results = _table(join(sweep, "results.csv"))
    assert len(results) == 4
    assert set(zip(results["init"], results["budget"], results["seed"])) == {
        (init, budget, 0) for init in ("random", "ssl") for budget in (4, 8)}
    for row in results.itertuples():
        metrics = read_run_metrics(row.run_dir)
        assert row.run_dir.startswith(join(sweep, "runs") + "/")
        assert row.test_dice == metrics.test.dice and row.test_iou == metrics.test.iou
        assert row.test_dice_LV == metrics.test.dice_per_class["LV"]
        assert row.epochs_to_95pct == metrics.convergence["epochs_to_95pct"]
        assert math.isclose(row.normalised_auc, metrics.convergence["normalised_auc"])
        # finished before the kill: never trained again; the others at most resumed once,
        # never by two drivers at once (each start begins where the last one stopped)
        starts = read_starts(row.run_dir)
        assert row.trainings == len(starts) and 1 <= len(starts) <= 2
        assert len(starts) == 1 or row.run_dir not in done_before
        assert [s["resume_epoch"] for s in starts] == sorted(s["resume_epoch"] for s in starts)
        assert "last.pt" not in list_files(row.run_dir)  # complete: the checkpoint is gone
    parquet = _table(join(sweep, "results.parquet"))
    assert parquet["test_dice"].tolist() == results["test_dice"].tolist()
    # both nodes ran trials, and each trial's torch threads equal its one-CPU share
    assert set(results["node_id"]) == cluster.node_ids()
    assert set(results["torch_threads"]) == {1}
    assert "| ssl | 8 |" in read_bytes(join(sweep, "report", "report.md")).decode()
    assert len(_table(join(sweep, "report", "tables", "runs.csv"))) == 4
    # console: one line per trial event and a closing table, not Tune's result dumps
    todo = 4 - len(done_before)
    assert (f"resuming, {len(done_before)} of 4 trials complete, " if done_before else
            "sweep tiny: ") + f"{todo} of 4 trials to run" in output
    assert output.count("start    ") == todo and output.count("done     ") == todo
    assert f"{todo} finished, 0 failed" in output and "trial_id" not in output
    # the report again, from a machine with nothing but the store
    report = subprocess.run(
        [sys.executable, "-m", "finetune", "report", sweep, "--out", join(sweep, "again")],
        env={**cluster.env, "MEDSSL_LOCAL_RUNS": str(tmp_path / "elsewhere")},
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert report.stdout.strip().splitlines()[-1] == join(sweep, "again", "report.html")
    assert "| ssl | 8 |" in read_bytes(join(sweep, "again", "report.md")).decode()


def test_sweep_equals_the_local_grid(submitted: Submitted, tmp_path: Path) -> None:
    """The sweep in the store, resumed across a killed job on wiped nodes, computed what
    the same runs compute one after another in a folder on this machine."""
    config = load_sweep_config(yaml.safe_load(read_bytes(join(submitted.sweep,
                                                               "sweep.yaml"))))
    trials = [t for t in plan_trials(config) if t.budget == 4 and t.seed == 0]
    base = trial_config(config, trials[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one-CPU trials ran
    try:
        local = run_grid(base, {t.init_name: t.init for t in trials}, [4], [0],
                         tmp_path / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)
    results = _table(join(submitted.sweep, "results.csv")).set_index("trial")
    for trial, metrics in zip(trials, local):
        row = results.loc[trial.key]
        assert row.test_dice == metrics["test"]["dice"]
        assert row.test_hd95_mm == metrics["test"]["hd95_mm"]
        assert row.best_dice == metrics["convergence"]["best_dice"]


def _wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"driver ended early: {process.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_failed_trial_is_retried_from_its_last_epoch(cluster: RayCluster, prepared: Path,
                                                     tmp_path: Path) -> None:
    config = _write_config(tmp_path, name="faulty", storage="storage", data=str(prepared),
                           base={**BASE, "epochs": 3}, inits={"random": "random"},
                           budgets=[4], seeds=[0], resources={"cpu": 1}, max_failures=1)
    env = {**cluster.env, "MEDSSL_SWEEP_FAULT": "random/budget00004/seed0@2"}
    result = _sweep(cluster, config, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "retry    random/budget00004/seed0" in result.stdout
    assert "injected failure after epoch 2" in result.stdout
    run_dir = tmp_path / "storage" / "faulty" / "runs" / "random" / "budget00004" / "seed0"
    assert [s["resume_epoch"] for s in read_starts(run_dir)] == [0, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complete"] and [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]


def test_gpu_request_on_a_cluster_without_gpus_fails_before_any_trial(
        cluster: RayCluster, prepared: Path, tmp_path: Path) -> None:
    config = _write_config(tmp_path, name="gpu", storage="storage", data=str(prepared),
                           base=BASE, inits={"random": "random"}, budgets=[4], seeds=[0],
                           resources={"cpu": 1, "gpu": 1})
    result = _sweep(cluster, config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key "
                                                             "'resources.gpu'")
    assert not (tmp_path / "storage" / "gpu" / "runs").exists()
    assert "Traceback" not in result.stderr


def test_the_cluster_stays_on_loopback(cluster: RayCluster) -> None:
    """Every socket of the cluster's processes is on a loopback address."""
    import psutil

    def is_ray(process: psutil.Process) -> bool:
        command = " ".join(process.info["cmdline"] or [])
        return str(cluster.temp_dir) in command or (process.info["name"] or "").startswith(
            ("ray::", "raylet", "gcs_server"))

    processes = [p for p in psutil.process_iter(["name", "cmdline"]) if is_ray(p)]
    assert len(processes) >= 4  # two raylets, GCS, dashboard at least
    checked = 0
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for connection in connections:
            checked += 1
            assert connection.laddr.ip.startswith(("127.", "::ffff:127.")) or \
                connection.laddr.ip == "::1", (process.info, connection)
            if connection.raddr:
                assert connection.raddr.ip.startswith(("127.", "::ffff:127.")), \
                    (process.info, connection)
    assert checked > 0
