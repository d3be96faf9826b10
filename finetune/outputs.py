"""A finished run's tabular outputs: one flat row for sweeps, one CSV line per epoch.

``metrics.json`` (``finetune.run_metrics``) holds everything, nested; sweeps (Ray Tune,
``finetune report``, a pandas notebook) want one flat record per run instead, and plots
want the curve as a table. Both are derived from the run's ``RunMetrics``, never computed
separately.

``row.json`` records its ``format_version`` (a notebook concatenating rows can check
it); the sweep's ``results.csv`` and the report's run table are built by ``result_row``
from ``metrics.json``, not from ``row.json``, so the version never becomes a column
there.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_json, atomic_write_text
from finetune.convergence import FRACTIONS_OF_BEST
from finetune.run_metrics import RunMetrics

ROW_FILE = "row.json"
EPOCHS_FILE = "epochs.csv"
ROW_FORMAT_VERSION = 1
ROW_UNVERSIONED = 1  # the layout of rows written before format_version was recorded

_CONVERGENCE_COLUMNS = (
    "best_dice", "best_epoch",
    *(f"{measure}_to_{round(fraction * 100)}pct" for fraction in FRACTIONS_OF_BEST
      for measure in ("epochs", "steps", "seconds")),
    "normalised_auc")
# every row has these; the per-class and per-target columns depend on the run
ROW_COLUMNS = ("init", "arch", "budget", "budget_unit", "train_slices", "seed", "run_dir",
               "epochs", "seconds", "test_dice", "test_iou", "test_hd95_mm",
               *_CONVERGENCE_COLUMNS)
ROW_COLUMN_PREFIXES = ("test_dice_", "test_iou_", "test_hd95_mm_", "epochs_to_dice_")
_EPOCH_COLUMNS = ("epoch", "step", "seconds", "lr", "encoder_frozen", "train_loss",
                  "train_images_per_s", "val_dice", "val_iou", "val_slice_dice")


def result_row(metrics: RunMetrics) -> dict[str, Any]:
    """One flat record of a run: what it was, how good it got on test, how fast."""
    if metrics.convergence is None:
        raise ValueError(f"{metrics.run_dir}: the run has no validated epoch yet, so no "
                         "result row")
    row: dict[str, Any] = {"init": metrics.init, "arch": metrics.arch,
                           "budget": metrics.budget, "budget_unit": metrics.budget_unit,
                           "train_slices": metrics.train_slices, "seed": metrics.seed,
                           "run_dir": metrics.run_dir}
    row["epochs"] = len(metrics.epochs)
    row["seconds"] = metrics.epochs[-1].seconds if metrics.epochs else None
    test = metrics.test
    row["test_dice"] = test.dice if test else None
    row["test_iou"] = test.iou if test else None
    row["test_hd95_mm"] = test.hd95_mm if test else None
    for name, value in (test.dice_per_class if test else {}).items():
        row[f"test_dice_{name}"] = value
    summary = test.summary if test else {}
    for key, column in (("volume_iou", "test_iou"), ("volume_hd95_mm", "test_hd95_mm")):
        for name, value in ((summary.get(key) or {}).get("per_class") or {}).items():
            row[f"{column}_{name}"] = value
    for key, value in metrics.convergence.items():
        if key == "epochs_to_dice":
            row.update({f"epochs_to_dice_{target}": epochs for target, epochs in value.items()})
        else:
            row[key] = value
    return row


def write_result_row(path: str | Path, row: dict[str, Any]) -> Path:
    """Write ``row`` atomically as ``row.json`` (``path``: a run folder or the file),
    with the row layout's ``format_version`` as its last key."""
    return atomic_write_json(_row_path(path), {**row, "format_version": ROW_FORMAT_VERSION})


def read_result_row(path: str | Path) -> dict[str, Any]:
    """The row in ``path`` (a run folder or its ``row.json``) without its version,
    checked strictly: invalid JSON, an unknown ``format_version``, a missing or unknown
    column, or a value that is not a plain number, string, bool or null is a
    ``ValueError`` naming the file and the key."""
    path = _row_path(path)
    try:
        row = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: the file must be a JSON object, not {type(row).__name__}")
    row = dict(row)
    version = row.pop("format_version", ROW_UNVERSIONED)
    if type(version) is not int or version != ROW_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected "
                         f"{ROW_FORMAT_VERSION}; a row without one is read as "
                         f"{ROW_UNVERSIONED})")
    unknown = [key for key in row if key not in ROW_COLUMNS
               and not key.startswith(ROW_COLUMN_PREFIXES)]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    missing = [key for key in ROW_COLUMNS if key not in row]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    nested = [key for key, value in row.items() if isinstance(value, dict | list)]
    if nested:
        raise ValueError(f"{path}: key {nested[0]!r} holds a "
                         f"{type(row[nested[0]]).__name__}; a row is flat")
    return row


def epochs_csv(metrics: RunMetrics) -> str:
    """The per-epoch curve as CSV, a column per validation class too; the validation
    cells of epochs that were not validated (``val_every``) are empty."""
    validated = [r for r in metrics.epochs if r.val_dice_per_class]
    classes = list(validated[0].val_dice_per_class or {}) if validated else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_EPOCH_COLUMNS, *(f"val_dice_{name}" for name in classes)])
    for record in metrics.epochs:
        per_class = record.val_dice_per_class or {}
        writer.writerow([_cell(getattr(record, column)) for column in _EPOCH_COLUMNS]
                        + [_cell(per_class.get(name)) for name in classes])
    return out.getvalue()


def write_outputs(run_dir: Path, metrics: RunMetrics) -> None:
    """``row.json`` and ``epochs.csv`` of a finished run (before its ``metrics.json``)."""
    write_result_row(run_dir / ROW_FILE, result_row(metrics))
    atomic_write_text(run_dir / EPOCHS_FILE, epochs_csv(metrics))


def _row_path(path: str | Path) -> Path:
    path = Path(path)
    return path / ROW_FILE if path.is_dir() else path


def _cell(value: Any) -> Any:
    return "" if value is None else value
