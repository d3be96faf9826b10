"""A finished run's tabular outputs: one flat row for sweeps, one CSV line per epoch.

``metrics.json`` holds everything, nested; sweeps (Ray Tune, ``finetune report``, a
pandas notebook) want one flat record per run instead, and plots want the curve as a
table. Both are derived from the metrics dict, never computed separately.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.json"  # everything about a run; complete once marked so
ROW_FILE = "row.json"
EPOCHS_FILE = "epochs.csv"
_EPOCH_COLUMNS = ("epoch", "step", "seconds", "lr", "encoder_frozen", "train_loss",
                  "train_images_per_s", "val_dice", "val_iou", "val_slice_dice")


def result_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat record of a run: what it was, how good it got on test, how fast."""
    test = metrics.get("test") or {}
    convergence = metrics["convergence"]
    row: dict[str, Any] = {key: metrics[key] for key in (
        "init", "arch", "budget", "budget_unit", "train_slices", "seed", "run_dir")}
    row["epochs"] = len(metrics["epochs"])
    row["seconds"] = metrics["epochs"][-1]["seconds"] if metrics["epochs"] else None
    for key in ("dice", "iou", "hd95_mm"):
        row[f"test_{key}"] = test.get(key)
    for name, value in (test.get("dice_per_class") or {}).items():
        row[f"test_dice_{name}"] = value
    summary = test.get("summary") or {}
    for key, column in (("volume_iou", "test_iou"), ("volume_hd95_mm", "test_hd95_mm")):
        for name, value in ((summary.get(key) or {}).get("per_class") or {}).items():
            row[f"{column}_{name}"] = value
    for key, value in convergence.items():
        if key == "epochs_to_dice":
            row.update({f"epochs_to_dice_{target}": epochs for target, epochs in value.items()})
        else:
            row[key] = value
    return row


def epochs_csv(metrics: dict[str, Any]) -> str:
    """The per-epoch curve as CSV, a column per validation class too; the validation
    cells of epochs that were not validated (``val_every``) are empty."""
    validated = [r for r in metrics["epochs"] if r.get("val_dice_per_class")]
    classes = list(validated[0]["val_dice_per_class"]) if validated else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_EPOCH_COLUMNS, *(f"val_dice_{name}" for name in classes)])
    for record in metrics["epochs"]:
        per_class = record["val_dice_per_class"] or {}
        writer.writerow([_cell(record.get(column)) for column in _EPOCH_COLUMNS]
                        + [_cell(per_class.get(name)) for name in classes])
    return out.getvalue()


def write_outputs(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(run_dir / ROW_FILE, result_row(metrics))
    atomic_write_text(run_dir / EPOCHS_FILE, epochs_csv(metrics))


def _cell(value: Any) -> Any:
    return "" if value is None else value
