"""Sweeps on a real two-node Ray cluster (loopback): job submission, crashes, retries.

One cluster (a head and a second node, one CPU each; conftest's session fixture
``cluster``) serves every test here; see ``ray_cluster.py`` for how it stays on loopback.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from finetune.grid import run_grid
from finetune.sweep_config import load_sweep_config, plan_trials, trial_config
from finetune.train import read_starts
from tests.ray_cluster import RayCluster

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


@pytest.fixture(scope="module")
def submitted(cluster: RayCluster, prepared: Path, pretrain_run: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2 inits x 2 budgets sweep submitted with `ray job submit`: four one-CPU trials,
    so each of the two one-CPU nodes must run some."""
    work = tmp_path_factory.mktemp("job")
    (work / "project").mkdir()
    config = _write_config(
        work / "project", name="tiny", storage=str(work / "storage"), data=str(prepared),
        base=BASE, inits={"random": "random", "ssl": str(pretrain_run / "export")},
        budgets=[4, 8], seeds=[0], resources={"cpu": 1})
    for _ in range(30):  # a fresh head's job agent may not be up yet: Ray says try again
        job = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir",
                          str(config.parent), "--", sys.executable, "-m", "finetune", "sweep",
                          "--config", "sweep.yaml", timeout=400)
        if "No available agent to submit job" not in job.stderr + job.stdout:
            break
        time.sleep(1)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    return work / "storage" / "tiny", job.stdout


def test_job_submit_runs_every_trial_on_both_nodes(cluster: RayCluster,
                                                   submitted: tuple[Path, str]) -> None:
    sweep_dir, output = submitted
    assert "succeeded" in output
    results = pd.read_csv(sweep_dir / "results.csv")
    assert len(results) == 4
    assert set(zip(results["init"], results["budget"], results["seed"])) == {
        (init, budget, 0) for init in ("random", "ssl") for budget in (4, 8)}
    for row in results.itertuples():
        metrics = json.loads((Path(row.run_dir) / "metrics.json").read_text())
        assert Path(row.run_dir).is_relative_to(sweep_dir / "runs")
        assert row.test_dice == metrics["test"]["dice"]
        assert row.test_iou == metrics["test"]["iou"]
        assert row.test_dice_LV == metrics["test"]["dice_per_class"]["LV"]
        assert row.epochs_to_95pct == metrics["convergence"]["epochs_to_95pct"]
        assert math.isclose(row.normalised_auc, metrics["convergence"]["normalised_auc"])
        assert row.trainings == 1
    parquet = pd.read_parquet(sweep_dir / "results.parquet")
    assert parquet["test_dice"].tolist() == results["test_dice"].tolist()
    # both nodes ran trials, and each trial's torch threads equal its one-CPU share
    assert set(results["node_id"]) == cluster.node_ids()
    assert set(results["torch_threads"]) == {1}
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "| ssl | 8 |" in report and (sweep_dir / "report" / "report.html").is_file()
    assert len(pd.read_csv(sweep_dir / "report" / "tables" / "runs.csv")) == 4
    # console: one line per trial event and a closing table, not Tune's result dumps
    assert output.count("start    ") == 4 and output.count("done     ") == 4
    assert "4 finished, 0 failed" in output and "trial_id" not in output


def test_sweep_equals_the_local_grid(submitted: tuple[Path, str], tmp_path: Path) -> None:
    sweep_dir, _ = submitted
    config = load_sweep_config(yaml.safe_load((sweep_dir / "sweep.yaml").read_text()))
    trials = [t for t in plan_trials(config) if t.budget == 4 and t.seed == 0]
    base = trial_config(config, trials[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one-CPU trials ran
    try:
        local = run_grid(base, {t.init_name: t.init for t in trials}, [4], [0],
                         tmp_path / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)
    results = pd.read_csv(sweep_dir / "results.csv").set_index("trial")
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


def test_killed_driver_resumes_without_training_finished_trials_again(
        cluster: RayCluster, prepared: Path, pretrain_run: Path, tmp_path: Path) -> None:
    config = _write_config(
        tmp_path, name="crash", storage="storage", data=str(prepared),
        base={**BASE, "epochs": 3},
        inits={"random": "random", "ssl": {"run": str(pretrain_run), "epochs": [1, 2]}},
        budgets=[4], seeds=[0, 1], resources={"cpu": 1})
    runs = tmp_path / "storage" / "crash" / "runs"

    def finished() -> list[Path]:
        return [p.parent for p in runs.rglob("metrics.json")
                if json.loads(p.read_text())["complete"]]

    driver = subprocess.Popen(
        [sys.executable, "-m", "finetune", "sweep", "--config", str(config), "--address",
         cluster.gcs_address], env=cluster.env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(finished()) >= 2, 300, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = {p: len(read_starts(p)) for p in finished()}
    assert len(done_before) < 6, "the sweep finished before it could be killed"
    resumed = _sweep(cluster, config)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "continuing Tune experiment" in resumed.stdout
    assert (f"sweep crash: resuming, {len(done_before)} of 6 trials complete, "
            f"{6 - len(done_before)} of 6 trials to run") in resumed.stdout
    results = pd.read_csv(tmp_path / "storage" / "crash" / "results.csv")
    assert sorted(results["init"].unique()) == ["random", "ssl-ep0001", "ssl-ep0002"]
    assert sorted(results["pretrain_epochs"].dropna().unique()) == [1, 2]
    assert len(results) == 6 and len(finished()) == 6
    report = (tmp_path / "storage" / "crash" / "report" / "report.md").read_text()
    assert "## How much pretraining is enough" in report
    assert "**ssl** at 4 slices: mean test Dice" in report
    for run_dir, starts in done_before.items():
        assert starts == 1 and len(read_starts(run_dir)) == 1, run_dir
    # a third run trains nothing at all and leaves Ray alone
    again = _sweep(cluster, config)
    assert again.returncode == 0 and "nothing to run" in again.stdout


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
