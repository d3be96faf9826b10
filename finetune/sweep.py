"""Fine-tuning sweeps on Ray Tune: every (init, budget, seed) as one trial, resumable.

The driver checks the whole sweep first (:mod:`finetune.sweep_checks`), then hands the
unfinished trials to Ray Tune, which places them on every CPU and GPU of the cluster
(or of a local instance), retries failed ones and restores its own state after a driver
crash. Resume never rests on Tune's state alone: it is written periodically and can
lag behind a crash, so a trial whose run folder holds complete metrics is not handed to
Tune again, and one that Tune re-runs finds its folder complete and trains nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_text
from cluster.config import dump_yaml, to_dict
from finetune.report import ReportSettings
from finetune.sweep_checks import check_resources, check_sweep
from finetune.sweep_config import (
    FAULT_ENV,
    SweepConfig,
    Trial,
    fingerprint,
    plan_trials,
    trial_config,
)
from finetune.sweep_results import SweepResults, finished_metrics, gather, write_results

RESOLVED_CONFIG = "sweep.yaml"
TUNE_FOLDER = "tune"


@dataclass
class SweepOutcome:
    results: SweepResults
    report: Path | None  # report.html, when a trial has finished
    where: str  # the Ray cluster or local instance that ran it


def run_sweep(config: SweepConfig, address: str | None = None, num_cpus: int | None = None,
              report: ReportSettings | None = None) -> SweepOutcome:
    """Run (or continue) the sweep; write results.csv/.parquet and the report.

    ``address``: a Ray cluster to join ("auto", "127.0.0.1:6379", ...); None joins the
    cluster of ``RAY_ADDRESS`` (``ray job submit`` sets it) or starts a local instance
    with ``num_cpus`` (default: all of this machine's). ``report``: the title and notes of
    the study report written at the end.
    """
    trials = plan_trials(config)
    check_sweep(config)
    config.sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.sweep_dir / RESOLVED_CONFIG, dump_yaml(config))
    todo = [trial for trial in trials if finished_metrics(trial) is None]
    if not todo:
        results = gather(trials)
        return SweepOutcome(results, write_results(config, results, report),
                            "nothing to run: every trial's run folder is complete")
    # Every path is absolute by now. Under `ray job submit` the driver starts in Ray's
    # copy of the working directory, which Ray may delete while the sweep still runs
    # (seen with Ray 2.60 once trial workers exit); the sweep folder stays.
    previous = os.getcwd()
    os.chdir(config.sweep_dir)
    where = _connect(address, num_cpus)
    import ray

    try:
        check_resources(config, [node["Resources"] for node in ray.nodes() if node["Alive"]])
        done = len(trials) - len(todo)
        state = f"resuming, {done} of {len(trials)} trials complete, " if done else ""
        print(f"sweep {config.name}: {state}{len(todo)} of {len(trials)} trials to run on "
              f"{where}", flush=True)
        _fit(config, trials, todo)
        results = gather(trials)
        # written before disconnecting: under `ray job submit` the driver's working
        # directory is Ray's, and leaving the cluster may delete it
        return SweepOutcome(results, write_results(config, results, report), where)
    finally:
        ray.shutdown()
        with contextlib.suppress(OSError):  # Ray's copy may be gone (see above)
            os.chdir(previous)


def _connect(address: str | None, num_cpus: int | None) -> str:
    from cluster.ray_local import connect

    # Only the test-only fault switch is forwarded: a runtime environment given here
    # would replace that of a `ray job submit` job (its working_dir: the driver's cwd).
    # Tune's working-directory change needs nothing: every path is absolute by now.
    forward = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    # Tune warns whenever trials checkpoint often; ours are tiny pointers, so it is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return connect(address, num_cpus=num_cpus, env_vars=forward)


def _fit(config: SweepConfig, trials: list[Trial], todo: list[Trial]) -> None:
    from ray import tune

    from finetune.sweep_console import SweepConsole
    from finetune.sweep_trial import run_trial

    trainable = tune.with_resources(run_trial, {"cpu": config.resources.cpu,
                                                "gpu": config.resources.gpu})
    # One Tune experiment per grid: a changed config never restores another's state.
    experiment = config.sweep_dir / TUNE_FOLDER / f"grid-{fingerprint(config)}"
    console = SweepConsole(len(trials), len(todo), config.table_every, config.max_failures)
    if tune.Tuner.can_restore(str(experiment)):
        print(f"continuing Tune experiment {experiment}", flush=True)
        # (its console callback comes back with the experiment and restarts its clock)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search([_trial_space(config, t) for t in todo])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=config.max_concurrent or None,
                # a finished trial's worker takes the next one: no new process, no new
                # imports (seconds per trial); each trial sets its own threads and caps
                reuse_actors=True,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=experiment.name, storage_path=str(experiment.parent), verbose=0,
                callbacks=[console],
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    tuner.fit()


def _trial_space(config: SweepConfig, trial: Trial) -> dict[str, Any]:
    return {"trial": trial.as_dict(), "finetune": to_dict(trial_config(config, trial))}


def _trial_name(trial: Any) -> str:  # a ray.tune Trial
    spec = trial.config["run"]["trial"]
    return f"{spec['init_name']}_b{spec['budget']}_s{spec['seed']}_{trial.trial_id}"
