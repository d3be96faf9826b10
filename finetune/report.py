"""The study report: accuracy against label budget and convergence speed per initialisation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cluster.atomic import atomic_path, atomic_write_text
from finetune.train import METRICS_FILE

REPORT_NAME = "report.md"


def collect_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete run's metrics under ``runs_dir`` (searched recursively)."""
    runs = []
    for path in sorted(Path(runs_dir).rglob(METRICS_FILE)):
        metrics = json.loads(path.read_text())
        if metrics.get("complete"):
            metrics["run_dir"] = str(path.parent)
            runs.append(metrics)
    return runs


def _group(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["init"], run["budget"])].append(run)
    return dict(sorted(groups.items()))


def _mean_std(values: list[float | None]) -> tuple[float, float, int]:
    clean = np.array([v for v in values if v is not None], dtype=float)
    if clean.size == 0:
        return float("nan"), float("nan"), 0
    return float(clean.mean()), float(clean.std()), int(clean.size)


def _fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def budget_unit(runs: list[dict[str, Any]]) -> str:
    """The runs' common budget unit: slices and patients do not share one axis."""
    units = {r.get("budget_unit", "slices") for r in runs}
    if len(units) > 1:
        raise ValueError(f"the runs mix budget units {sorted(units)}; report each unit's "
                         "runs separately (--runs on separate folders)")
    return units.pop()


def plot_dice_vs_budget(runs: list[dict[str, Any]], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6, 4))
    by_init: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (init, budget), group in _group(runs).items():
        mean, std, _ = _mean_std([r["test"]["dice"] for r in group])
        by_init[init].append((budget, mean, std))
    for init, points in by_init.items():
        budgets, means, stds = map(np.array, zip(*sorted(points)))
        ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=init)
    ax.set_xscale("log")
    ax.set_xlabel(f"label budget (annotated training {budget_unit(runs)})")
    ax.set_ylabel("test Dice (mean over foreground classes)")
    ax.set_title("Accuracy against label budget")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(figure, path)


def plot_val_curves(runs: list[dict[str, Any]], path: Path) -> None:
    budgets = sorted({r["budget"] for r in runs})
    figure, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for (init, group_budget), group in _group(runs).items():
            if group_budget != budget:
                continue
            length = min(len(r["epochs"]) for r in group)
            curves = np.array([[e["val_dice"] for e in r["epochs"][:length]] for r in group])
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, curves.mean(axis=0), marker=".", label=init)
            if len(group) > 1:
                ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
        ax.set_title(f"budget {budget} {budget_unit(runs)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_report(runs: list[dict[str, Any]], out_dir: str | Path, title: str = "medssl report",
                 notes: list[str] | None = None, filename: str = REPORT_NAME) -> Path:
    """Write ``filename`` (``report.md``) with its two PNG plots into ``out_dir``; return
    its path."""
    if not runs:
        raise ValueError("no complete fine-tuning runs to report on")
    unit = budget_unit(runs)  # fails before any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_dice_vs_budget(runs, out / "dice_vs_budget.png")
    plot_val_curves(runs, out / "val_dice_curves.png")
    class_names = list(runs[0]["test"]["dice_per_class"])
    lines = [f"# {title}", ""]
    lines += [*(notes or []), ""] if notes else []
    lines += [
        f"{len(runs)} fine-tuning runs: initialisations "
        f"{', '.join(sorted({r['init'] for r in runs}))}; label budgets "
        f"{', '.join(str(b) for b in sorted({r['budget'] for r in runs}))} {unit}; seeds "
        f"{', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}.",
        "Test Dice is measured on 3D volumes (slices reassembled per patient and frame) with "
        "the checkpoint of the best validation epoch, averaged over foreground classes; "
        "± is the standard deviation over seeds.",
        "",
        "## Accuracy against label budget",
        "",
        "![test Dice against label budget](dice_vs_budget.png)",
        "",
        "| init | budget | seeds | test Dice | " + " | ".join(class_names) + " |",
        "|---|---:|---:|---|" + "---|" * len(class_names),
    ]
    for (init, budget), group in _group(runs).items():
        mean, std, n = _mean_std([r["test"]["dice"] for r in group])
        per_class = [_fmt(*_mean_std([r["test"]["dice_per_class"][c] for r in group]))
                     for c in class_names]
        lines.append(f"| {init} | {budget} | {n} | {_fmt(mean, std, n)} | "
                     + " | ".join(per_class) + " |")
    lines += [
        "",
        "## Convergence speed",
        "",
        "![validation Dice against epoch](val_dice_curves.png)",
        "",
        "Epochs (and optimizer steps) to first reach 95% and 99% of each run's best "
        "validation Dice; normalised AUC is the mean validation Dice over epochs.",
        "",
        "| init | budget | best val Dice | epochs to 95% | steps to 95% | epochs to 99% "
        "| normalised AUC |",
        "|---|---:|---|---|---|---|---|",
    ]
    for (init, budget), group in _group(runs).items():
        conv = [r["convergence"] for r in group]
        lines.append(
            f"| {init} | {budget} | {_fmt(*_mean_std([c['best_dice'] for c in conv]))} "
            f"| {_fmt(*_mean_std([c['epochs_to_95pct'] for c in conv]), digits=1)} "
            f"| {_fmt(*_mean_std([c['steps_to_95pct'] for c in conv]), digits=0)} "
            f"| {_fmt(*_mean_std([c['epochs_to_99pct'] for c in conv]), digits=1)} "
            f"| {_fmt(*_mean_std([c['normalised_auc'] for c in conv]))} |"
        )
    lines += ["", "## Runs", "", "| init | budget | seed | run folder |", "|---|---:|---:|---|"]
    for run in sorted(runs, key=lambda r: (r["init"], r["budget"], r["seed"])):
        lines.append(f"| {run['init']} | {run['budget']} | {run['seed']} | "
                     f"{Path(run['run_dir']).resolve()} |")
    path = out / filename
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
