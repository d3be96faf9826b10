"""The runs a study report is about: read from a sweep folder or any folder of run folders.

A report must not silently drop what did not finish, nor pool runs that cannot be
compared. Unfinished runs (a metrics file not marked complete, or a sweep trial with no
metrics at all) are listed; runs of different budget units, datasets or class sets are
refused with the runs that disagree named, and so is a metrics file that cannot be read
(invalid, another layout or version): its path and the key are named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cluster.storage import is_url, join, local_path, parent_of
from cluster.storage.objects import list_files, read_text
from cluster.storage.urls import absolute
from finetune.outputs import result_row
from finetune.report_stats import pretraining_epochs, pretraining_series
from finetune.run_metrics import METRICS_FILE, RunMetrics, read_run_metrics

SWEEP_CONFIG = "sweep.yaml"  # finetune.sweep writes the resolved config under this name


@dataclass
class Unfinished:
    run_dir: str
    why: str


@dataclass
class StudyRuns:
    """Complete runs as one table (a row each, ``result_row``'s columns plus
    ``pretrain_epochs``) and as their metrics, and what did not finish."""

    frame: pd.DataFrame
    metrics: list[RunMetrics]
    unfinished: list[Unfinished] = field(default_factory=list)
    sweep: dict[str, Any] | None = None  # the sweep's resolved config, when read from one

    @property
    def class_names(self) -> list[str]:
        return self.metrics[0].class_names if self.metrics else []

    @property
    def data(self) -> str | None:
        return self.metrics[0].config.get("data") if self.metrics else None


def load_study(path: str | Path) -> StudyRuns:
    """Every run under ``path`` (a sweep folder, or any folder holding run folders; a
    path or an ``s3://`` URL)."""
    if not is_url(path) and not local_path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder of runs")
    names = list_files(path)  # one listing, also of an object store
    if not names and is_url(path):
        raise FileNotFoundError(f"{path}: no such folder of runs")
    sweep = yaml.safe_load(read_text(join(path, SWEEP_CONFIG))) if SWEEP_CONFIG in names \
        else None
    metrics, unfinished = [], []
    found = [name for name in names if name.rsplit("/", 1)[-1] == METRICS_FILE]
    for name in sorted(found, key=lambda n: n.split("/")):
        location = join(path, name)
        try:
            loaded = read_run_metrics(location)
        except OSError as exc:  # a store failing past its retries too (StorageError)
            raise ValueError(f"{location}: not a readable metrics file ({exc})") from None
        # where the run is now, not where it was written (a copied or moved study)
        loaded.run_dir = parent_of(location) if is_url(path) else \
            str(Path(location).parent.resolve())
        if loaded.complete:
            metrics.append(loaded)
        else:
            planned = loaded.config.get("epochs", "?")
            unfinished.append(Unfinished(loaded.run_dir, f"stopped after epoch "
                                                         f"{len(loaded.epochs)} of {planned}"))
    if sweep is not None:
        unfinished += _missing_trials(sweep, {m.run_dir for m in metrics}
                                      | {u.run_dir for u in unfinished})
    check_comparable(metrics)
    frame = pd.DataFrame([_row(m) for m in metrics])
    return StudyRuns(frame, metrics, unfinished, sweep)


def check_comparable(metrics: list[RunMetrics]) -> None:
    """Refuse runs that do not share one budget unit, one dataset and one class set."""
    for what, key in (("budget units", _unit), ("datasets", _dataset),
                      ("class sets", _classes)):
        groups: dict[str, str] = {}
        for run in metrics:
            groups.setdefault(key(run), run.run_dir)
        if len(groups) > 1:
            named = "; ".join(f"{value} (e.g. {run_dir})" for value, run_dir in groups.items())
            raise ValueError(f"the runs mix {what}: {named}; report each on its own")


def _unit(run: RunMetrics) -> str:
    return run.budget_unit


def _dataset(run: RunMetrics) -> str:
    data = run.config.get("data")
    return absolute(data) if data else "(unknown)"


def _classes(run: RunMetrics) -> str:
    return ", ".join(run.class_names)


def _row(metrics: RunMetrics) -> dict[str, Any]:
    row = result_row(metrics)
    row["pretrain_epochs"] = pretraining_epochs(str(row["init"]))
    return row


def _missing_trials(sweep: dict[str, Any], seen: set[str]) -> list[Unfinished]:
    """The sweep's planned trials with no metrics file at all."""
    from finetune.sweep_config import load_sweep_config, plan_trials

    try:
        trials = plan_trials(load_sweep_config(sweep))
    except ValueError:  # the sweep's inits moved since: its run folders still count
        return []
    return [Unfinished(t.run_dir, "never started (no metrics.json)") for t in trials
            if t.run_dir not in seen]


def probe_curves(metrics: list[RunMetrics]) -> pd.DataFrame:
    """The live segmentation probe's curve of each pretraining series' run: ``series,
    epoch, step, dice`` (empty when no series' run probed). A series member's init is a
    kept checkpoint ``RUN/checkpoints/epochNNNN.pt``; its run's ``probe.csv`` sits in RUN.
    """
    from pretrain.probe_log import PROBE_FILE, read_probe_log

    rows, seen = [], set()
    for run in metrics:
        epochs = pretraining_epochs(run.init)
        chain = run.init_chain
        if math.isnan(epochs) or not chain or chain[0].get("kind") != "checkpoint":
            continue  # NaN: not a series member
        series = pretraining_series(run.init)
        pretrain_run = parent_of(parent_of(chain[0]["init"]))
        if (series, pretrain_run) in seen:
            continue
        seen.add((series, pretrain_run))
        rows += [{"series": series, "epoch": r["epoch"], "step": r["step"], "dice": r["dice"]}
                 for r in read_probe_log(join(pretrain_run, PROBE_FILE))]
    return pd.DataFrame(rows, columns=["series", "epoch", "step", "dice"])
