"""A sweep's results, gathered from its run folders: one table row per finished trial.

The run folders, not Tune's result objects, are read: they are complete whether a trial
ran in this driver, in one that was killed, or in an earlier sweep, and they are what
``finetune report`` reads too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cluster.storage import is_url, join
from cluster.storage.mirror import FolderMirror, local_folder_for
from cluster.storage.objects import read_text
from finetune.outputs import result_row
from finetune.report import ReportSettings, publish_report, write_table
from finetune.run_metrics import RunMetrics, read_run_metrics
from finetune.sweep_config import TRIAL_FILE, SweepConfig, Trial
from finetune.train import read_starts

RESULTS = "results"  # results.csv and results.parquet
RESULTS_CSV, RESULTS_PARQUET = f"{RESULTS}.csv", f"{RESULTS}.parquet"
REPORT_FOLDER = "report"


@dataclass
class SweepResults:
    rows: list[dict[str, Any]]  # finished trials
    runs: list[RunMetrics]  # their metrics.json, for the report
    unfinished: list[Trial]

    @property
    def complete(self) -> bool:
        return not self.unfinished


def finished_metrics(trial: Trial) -> RunMetrics | None:
    """The trial's metrics when its run is complete (where it lives: on storage every
    node sees, or in the object store); None when it has not finished (a metrics file
    that cannot be read is an error naming it)."""
    try:
        metrics = read_run_metrics(trial.run_dir)
    except FileNotFoundError:
        return None
    return metrics if metrics.complete else None


def gather(trials: list[Trial]) -> SweepResults:
    rows, runs, unfinished = [], [], []
    for trial in trials:
        metrics = finished_metrics(trial)
        if metrics is None:
            unfinished.append(trial)
            continue
        runs.append(metrics)
        rows.append(_row(trial, metrics))
    return SweepResults(rows, runs, unfinished)


def _row(trial: Trial, metrics: RunMetrics) -> dict[str, Any]:
    run_dir = trial.run_dir
    try:
        info = json.loads(read_text(join(run_dir, TRIAL_FILE)))
    except FileNotFoundError:
        info = {}
    row = {"trial": trial.key, "pretrain_epochs": trial.pretrain_epochs, **result_row(metrics)}
    row["run_dir"] = run_dir
    row["wall_seconds"] = info.get("wall_seconds")
    row["node_id"] = info.get("node_id")
    row["torch_threads"] = info.get("torch_threads")
    row["trainings"] = len(read_starts(run_dir))  # >1: resumed after a crash or retry
    return row


def write_results(config: SweepConfig, results: SweepResults,
                  settings: ReportSettings | None = None) -> str | None:
    """``results.csv`` and ``results.parquet`` in the sweep folder, then the study report
    in ``report/`` (``settings``: its title, notes, ...); returns the report page's path
    or URL (None when no trial has finished)."""
    folder = config.sweep_dir
    table = pd.DataFrame(results.rows)
    if is_url(folder):  # written locally, then uploaded (one object each)
        staging = local_folder_for(folder)
        write_table(staging / RESULTS, table)
        FolderMirror(staging, folder).push(only=[RESULTS_CSV, RESULTS_PARQUET])
    else:
        write_table(Path(folder) / RESULTS, table)
    if not results.runs:
        return None
    settings = settings or ReportSettings()
    settings.notes = [*settings.notes,
                      f"Sweep `{config.name}`: {len(results.rows)} of "
                      f"{len(results.rows) + len(results.unfinished)} trials finished; one "
                      f"row each in `{RESULTS_CSV}` / `{RESULTS_PARQUET}` beside this folder."]
    return publish_report(folder, join(folder, REPORT_FOLDER), settings)
