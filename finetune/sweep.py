"""Fine-tuning sweeps on Ray Tune: every (init, budget, seed) as one trial, resumable.

The driver checks the whole sweep first (:mod:`finetune.sweep_checks`), takes the
sweep's lease (one driver at a time, :mod:`cluster.storage.lease`), then hands the
unfinished trials to Ray Tune, which places them on every CPU and GPU of the cluster
(or of a local instance) and retries failed ones. Resume rests on the run folders
alone, never on Tune's state (written periodically, it lags behind a crash): a trial
whose run folder holds complete metrics is not handed to Tune again, one that is
continues from its last saved epoch. The sweep's storage may be a shared file system
or an object store (``storage: s3://...``); so may each run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import dump_yaml, to_dict
from cluster.parent_watch import RAY_JOB_ENV, exit_with_parent, under_ray_job
from cluster.storage import is_url, join
from cluster.storage.lease import Lease, LeaseRecord, default_holder
from cluster.storage.mirror import local_folder_for
from cluster.storage.objects import write_text
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


LEASE_FILE = "driver.lease"  # who drives the sweep now (cluster/storage/lease.py)


@dataclass
class SweepOutcome:
    results: SweepResults
    report: str | None  # report.html (a path or a URL), when a trial has finished
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
    lease = take_lease(config)
    try:
        return _drive(config, trials, address, num_cpus, report)
    finally:
        lease.release()


def take_lease(config: SweepConfig) -> Lease:
    """Become the sweep's one driver: a lease in its storage, renewed while this process
    lives. Another live driver is waited for up to twice the lease's time to live, then
    named in the error; a dead one's lease lapses and is taken over. A driver that loses
    its lease, or (under ``ray job submit``) its job's process, stops at once."""
    job = os.environ.get(RAY_JOB_ENV, "")
    holder = default_holder() + (f", Ray job {_job_id(job)}" if job else "")
    lease = Lease(join(config.sweep_dir, LEASE_FILE), ttl=config.lease_s, holder=holder)

    def waiting(record: LeaseRecord) -> None:
        print(f"sweep {config.name}: driven by {record.holder}; waiting up to "
              f"{2 * config.lease_s:g} s for it to end or its lease to lapse", flush=True)

    lease.acquire(wait=2 * config.lease_s, on_wait=waiting)

    def lost(why: str) -> None:
        print(f"error: sweep {config.name}: lost its driver lease ({why}); stopping",
              file=sys.stderr, flush=True)
        os._exit(1)  # Ray stops this driver's trials when it is gone

    lease.keep(on_lost=lost)
    if under_ray_job():
        exit_with_parent(f"sweep {config.name}")
    return lease


def _job_id(job_config: str) -> str:
    try:
        return str(json.loads(job_config)["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return "?"


def _drive(config: SweepConfig, trials: list[Trial], address: str | None,
           num_cpus: int | None, report: ReportSettings | None) -> SweepOutcome:
    write_text(join(config.sweep_dir, RESOLVED_CONFIG), dump_yaml(config))
    todo = [trial for trial in trials if finished_metrics(trial) is None]
    if not todo:
        results = gather(trials)
        return SweepOutcome(results, write_results(config, results, report),
                            "nothing to run: every trial's run folder is complete")
    # Every path is absolute by now. Under `ray job submit` the driver starts in Ray's
    # copy of the working directory, which Ray may delete while the sweep still runs
    # (seen with Ray 2.60 once trial workers exit): work from the sweep folder, or for
    # a sweep in an object store from its node-local folder.
    previous = os.getcwd()
    workdir = local_folder_for(config.sweep_dir) if is_url(config.sweep_dir) \
        else Path(config.sweep_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
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
    # A new Tune experiment at every start, over the trials not yet complete: resuming
    # rests on the run folders alone. (Restoring Tune's own state brought back
    # checkpoints it had already rotated away, each restore failure costing the trial a
    # retry.) Its state goes to the sweep's storage, an object store included.
    started = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    console = SweepConsole(len(trials), len(todo), config.table_every, config.max_failures)
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
            name=f"grid-{fingerprint(config)}-{started}",
            storage_path=join(config.sweep_dir, TUNE_FOLDER), verbose=0,
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
