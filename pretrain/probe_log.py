"""The live segmentation probe's log, ``probe.csv``: one reader and writer, light to import
(the study report reads it without torch)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_text
from cluster.storage.objects import read_text

PROBE_FILE = "probe.csv"
FRACTION_OF_BEST = 0.95


class ProbeLog:
    """``probe.csv`` in the run folder: one row per probe, rewritten atomically."""

    def __init__(self, run_dir: Path, class_names: list[str]):
        self.path = Path(run_dir) / PROBE_FILE
        self.classes = list(class_names[1:])  # foreground classes
        self.rows = read_probe_log(self.path)

    def has(self, step: int) -> bool:
        return any(int(row["step"]) == step for row in self.rows)

    def add(self, epoch: float, step: int, result: dict[str, Any]) -> dict[str, Any]:
        row = {"epoch": round(epoch, 4), "step": step, "dice": result["dice"],
               **{f"dice_{name}": result["per_class"].get(name) for name in self.classes},
               "seconds": round(result["seconds"], 3)}
        self.rows = [r for r in self.rows if int(r["step"]) != step] + [row]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda r: int(r["step"])))
        atomic_write_text(self.path, out.getvalue())
        return row


def read_probe_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``probe.csv`` (a path or a URL; numbers as numbers); [] when there
    is none."""
    try:
        text = read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        return []
    rows = []
    for raw in csv.DictReader(text.splitlines()):
        row: dict[str, Any] = {}
        for key, value in raw.items():
            row[key] = None if value in ("", None) else (
                int(value) if key == "step" else float(value))
        rows.append(row)
    return rows


def probe_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best probe epoch and the first epoch reaching 95% of the best probe Dice."""
    if not rows:
        return None
    ordered = sorted(rows, key=lambda r: r["step"])
    best = max(ordered, key=lambda r: r["dice"])
    first = next(r for r in ordered if r["dice"] >= FRACTION_OF_BEST * best["dice"])
    return {"best_dice": best["dice"], "best_epoch": best["epoch"],
            "epoch_to_95pct": first["epoch"], "probes": len(ordered),
            "seconds": sum(r["seconds"] for r in ordered),
            "curve": [{"epoch": r["epoch"], "step": r["step"], "dice": r["dice"]}
                      for r in ordered]}
