"""Study report build time on a generated 600-run sweep (issue target: < 30 s on 2 cores).

A real 600-run sweep takes days of GPU time, so the runs are generated instead: one
``metrics.json`` per run, built and written as ``finetune.train`` does it (a
``finetune.run_metrics.RunMetrics`` of per-epoch records, validation and convergence
blocks, a test block with its volume summary, the config as
``cluster.config.to_dict(FinetuneConfig(...))``), plus the ``row.json`` and
``epochs.csv`` that ``finetune.outputs`` writes next to it. Default grid: 6 inits × 10
label budgets (1–1498 slices) × 10 seeds, 150 epochs (every one validated), classes
RV/MYO/LV. Curves rise with epochs and level off higher for larger budgets and better
inits; a seed's label subset is shared by all inits (paired), as in a sweep. The
convergence block is computed by ``RunMetrics.summarise`` from the generated curve, as
for a real run. ``config.data`` points to a path that does not exist, so the overlay
grid cannot be drawn.

The report is then timed in a fresh Python process (a report command is one), so the
first import of the report stack is measured, not hidden by this script's own imports:

- imports: ``import finetune.report`` (torch, pandas, scipy, matplotlib ...);
- cold: the first ``build_report(runs, report, ReportSettings(overlays=0))`` in that
  process (lazy imports such as pyarrow's on the first parquet write land here);
- warm: the best of ``--repeats`` further calls in the same process.

Each call is split into phases by wrapping, in that child process only, functions that
``build_report`` looks up at call time (``load_study``, ``_tables``, ``_write_table``, the
figure functions, ``write_pages``); the remainder (findings, table views) is "other".
A phase whose function no longer exists is shown as "–" and lands in "other". Then
``python -m finetune report RUNS`` (default settings: overlays on, so the report says
why the grid is missing) is timed end to end as a user runs it. The metrics files were
just written, so they are read from the page cache in every measurement.

Example (2 cores: about 45 s in all, 9 s of it generating the runs)::

    python benchmarks/report_build.py --work /tmp/medssl-report --json /tmp/report_build.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.run_metrics import RunMetrics

INITS = ("random", "imagenet", "simclr", "vicreg", "barlow", "byol")
# how much an init helps (0: random): sets plateau height, label needs and speed
QUALITY = {"random": 0.0, "imagenet": 0.45, "simclr": 0.55, "vicreg": 0.6, "barlow": 0.7,
           "byol": 0.8}
BUDGETS = (1, 3, 7, 15, 30, 75, 150, 300, 749, 1498)
CLASSES = ("RV", "MYO", "LV")
CLASS_FACTOR = (0.93, 0.97, 1.06)  # RV hardest, LV easiest, relative to the mean curve
MISSING_DATA = "/nonexistent/medssl-report-bench/prepared"  # no dataset: no overlay grid
ARCH = "resnet50"
BATCH = 16
TEST_VOLUMES = 20
TEST_SLICES = 380
PHASES = ("load", "tables", "write_tables", "figures", "pages")
FIGURES = ("dice_vs_budget", "validation_curves", "speedups", "labels_needed",
           "pretraining_length")


# --- generated runs ---------------------------------------------------------------------


def init_fields(name: str) -> tuple[str, list[dict[str, Any]]]:
    """``FinetuneConfig.init`` and the ``init_chain`` a run of this init records."""
    if name == "random":
        return "random", [{"init": "random", "kind": "random"}]
    if name == "imagenet":
        return "timm", [{"init": "timm", "kind": "timm", "weights": ARCH}]
    path = f"/nonexistent/medssl-report-bench/pretrain/{name}/export"
    return path, [{"init": path, "kind": "unresolved", "source": path}]


def run_metrics(init: str, index: int, budget: int, seed: int, epochs: int,
                budgets: Sequence[int], run_dir: Path, base_seed: int) -> RunMetrics:
    """One complete run's metrics, as ``finetune.train.fine_tune`` returns them."""
    import numpy as np

    from finetune.config import FinetuneConfig
    from finetune.run_metrics import EpochRecord, RunMetrics, TestMetrics
    from pretrain.schedules import warmup_cosine

    q = QUALITY.get(init, 0.5)
    subset = np.random.default_rng([base_seed, 10_000, budget, seed])  # shared by inits
    own = np.random.default_rng([base_seed, index, budget, seed])
    # plateau: logistic in log(budget); better inits need fewer labels and level off higher
    sat = 1 / (1 + math.exp(-(math.log(budget) - math.log(25 * math.exp(-2.2 * q)))))
    spread = 0.01 + 0.05 * (1 - sat)  # seeds differ most at small budgets
    plateau = 0.12 + (0.86 + 0.04 * q - 0.12) * sat
    plateau += spread * (0.8 * subset.standard_normal() + 0.6 * own.standard_normal())
    tau = (8 + 22 * (1 - q)) * (0.8 + 0.08 * math.log(budget))  # epochs to ~63%
    e = np.arange(1, epochs + 1, dtype=float)
    mean = 0.02 + (plateau - 0.02) * (1 - np.exp(-e / tau))
    mean -= 0.05 * (1 - sat) * np.clip(e - 3 * tau, 0, None) / epochs  # small budgets overfit
    noise = 0.004 + 0.02 * (1 - sat)
    common = own.normal(0, noise, epochs)[:, None]
    per_class = np.clip(mean[:, None] * np.array(CLASS_FACTOR) + common
                        + own.normal(0, noise / 2, (epochs, len(CLASSES))), 0.0, 0.99)
    val_dice = per_class.mean(axis=1)

    epoch_samples = max(budgets)
    steps_per_epoch = max(1, epoch_samples // BATCH)
    total_steps = steps_per_epoch * epochs
    images_per_s = own.normal(160, 6) * (1 + own.normal(0, 0.02, epochs))
    seconds = np.cumsum(steps_per_epoch * BATCH / images_per_s + 1.5)
    loss = 0.15 + 0.3 * (1 - plateau) + 1.1 * np.exp(-e / (0.7 * tau)) \
        + own.normal(0, 0.01, epochs)
    records = []
    for k in range(epochs):
        step = (k + 1) * steps_per_epoch
        dice_k = per_class[k]
        records.append(EpochRecord(
            epoch=k + 1, step=step, seconds=round(float(seconds[k]), 3),
            train_loss=float(loss[k]),
            lr=warmup_cosine(step - 1, total_steps, steps_per_epoch, 1e-4),
            encoder_frozen=False,
            train_images_per_s=round(float(images_per_s[k]), 2),
            validated=True,
            val_dice=float(val_dice[k]),
            val_iou=float(np.mean(dice_k / (2 - dice_k))),
            val_dice_per_class={c: float(v) for c, v in zip(CLASSES, dice_k)},
            val_slice_dice=float(np.clip(val_dice[k] - 0.03 + own.normal(0, 0.005), 0, 1)),
        ))

    best = int(np.argmax(val_dice))
    test_dice = np.clip(per_class[best] - 0.01
                        + own.normal(0, 0.015 + 0.03 * (1 - sat), len(CLASSES)), 0.0, 0.99)
    test_iou = test_dice / (2 - test_dice)
    hd95 = 2.0 + 40 * (1 - test_dice) ** 1.5 + np.abs(own.normal(0, 1, len(CLASSES)))
    summary = {"slices": TEST_SLICES, "volumes": TEST_VOLUMES,
               "slice_dice": _aggregate(np.clip(test_dice - 0.03, 0, 1)),
               "slice_iou": _aggregate(np.clip(test_iou - 0.03, 0, 1)),
               "volume_dice": _aggregate(test_dice), "volume_iou": _aggregate(test_iou),
               "volume_hd95_mm": _aggregate(hd95)}
    test = TestMetrics(dice=summary["volume_dice"]["mean"], iou=summary["volume_iou"]["mean"],
                       hd95_mm=summary["volume_hd95_mm"]["mean"],
                       dice_per_class=summary["volume_dice"]["per_class"], summary=summary)
    config_init, chain = init_fields(init)
    config = FinetuneConfig(data=MISSING_DATA, out=str(run_dir), arch=ARCH, init=config_init,
                            init_name=init, budget=budget, seed=seed, epochs=epochs,
                            batch_size=BATCH, epoch_samples=epoch_samples, progress=False)
    return RunMetrics.summarise(config, records, train_slices=budget, init_chain=chain,
                                test=test)


def _aggregate(values: Any) -> dict[str, Any]:
    """``SegmentationMetrics.summary``'s per-metric block: mean, per class, counted."""
    return {"mean": float(values.mean()),
            "per_class": {c: float(v) for c, v in zip(CLASSES, values)},
            "counted": dict.fromkeys(CLASSES, TEST_VOLUMES)}


def generate(runs: Path, inits: Sequence[str], budgets: Sequence[int], seeds: int,
             epochs: int, base_seed: int = 0) -> int:
    """Write every run folder under ``runs`` (replacing it); return the number of runs."""
    from finetune.outputs import write_outputs
    from finetune.run_metrics import write_run_metrics

    shutil.rmtree(runs, ignore_errors=True)
    count = 0
    for index, init in enumerate(inits):
        for budget in budgets:
            for seed in range(seeds):
                run_dir = runs / init / f"budget{budget:05d}" / f"seed{seed}"
                run_dir.mkdir(parents=True)
                metrics = run_metrics(init, index, budget, seed, epochs, budgets, run_dir,
                                      base_seed)
                # as fine_tune writes them: row and curve first, metrics.json last
                write_outputs(run_dir, metrics)
                write_run_metrics(run_dir, metrics)
                count += 1
    return count


# --- the timed child process ------------------------------------------------------------


def _wrap(module: Any, name: str, phase: str, clock: dict[str, float]) -> bool:
    """Replace ``module.name`` by a version adding its wall time to ``clock[phase]``."""
    original = getattr(module, name, None)
    if original is None:
        return False

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock[phase] = clock.get(phase, 0.0) + time.perf_counter() - start

    setattr(module, name, timed)
    return True


def measure_child(runs: Path, out: Path, repeats: int) -> dict[str, Any]:
    """In a fresh process: import time, then one cold and ``repeats`` warm builds."""
    start = time.perf_counter()
    import finetune.report as report
    import finetune.report_figures as figures
    imports = time.perf_counter() - start

    clock: dict[str, float] = {}
    wrapped = {phase: _wrap(report, name, phase, clock) for phase, name in (
        ("load", "load_study"), ("tables", "_tables"), ("write_tables", "_write_table"),
        ("pages", "write_pages"))}
    figure_clock: dict[str, float] = {}
    wrapped["figures"] = any([_wrap(figures, name, name, figure_clock) for name in FIGURES])
    builds = []
    for _ in range(1 + repeats):
        shutil.rmtree(out, ignore_errors=True)
        clock.clear()
        figure_clock.clear()
        load_before = os.getloadavg()[0]
        begin = time.perf_counter()
        report.build_report(runs, out, report.ReportSettings(overlays=0))
        total = time.perf_counter() - begin
        phases: dict[str, float | None] = {
            phase: (sum(figure_clock.values()) if phase == "figures" else clock.get(phase, 0.0))
            if wrapped[phase] else None for phase in PHASES}
        phases["other"] = total - sum(v for v in phases.values() if v is not None)
        builds.append({"total_s": total, "phases_s": phases,
                       "figures_s": dict(figure_clock), "load_before": load_before,
                       "load_after": os.getloadavg()[0]})
    return {"imports_s": imports, "builds": builds}


def import_breakdown(python: str, top: int = 8) -> list[tuple[str, float]]:
    """Self import time per top-level package of ``import finetune.report``
    (``python -X importtime`` in a fresh process), largest first."""
    done = subprocess.run([python, "-X", "importtime", "-c", "import finetune.report"],
                          capture_output=True, text=True, check=True)
    per_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].strip().startswith("import time:"):
            continue
        try:
            self_us = int(parts[0].split(":")[1])
        except ValueError:  # the header line
            continue
        package = parts[2].strip().split(".")[0]
        per_package[package] = per_package.get(package, 0.0) + self_us / 1e6
    return sorted(per_package.items(), key=lambda item: -item[1])[:top]


# --- the parent: generate, time, print ---------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def time_cli(python: str, runs: Path, out: Path) -> dict[str, Any]:
    """``python -m finetune report RUNS --out OUT`` end to end, default settings."""
    shutil.rmtree(out, ignore_errors=True)
    begin = time.perf_counter()
    done = subprocess.run([python, "-m", "finetune", "report", str(runs), "--out", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - begin
    page = out / "report.md"
    says_why = page.is_file() and "Not drawn: the dataset" in page.read_text()
    return {"wall_s": wall, "rc": done.returncode, "overlay_note": says_why,
            "error": done.stderr[-2000:] if done.returncode else "",
            "report_bytes": folder_bytes(out) if out.is_dir() else 0}


def _cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    runs, child = result["runs"], result["child"]
    header = ("| build | runs | imports s | load s | tables s | write tables s | figures s "
              "| pages s | other s | total s | report MB |")
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    warm = child["builds"][1:]
    rows = [("cold (1st call, new process)", child["imports_s"], child["builds"][0])]
    if warm:
        best = min(warm, key=lambda b: b["total_s"])
        rows.append((f"warm (best of {len(warm)})", None, best))
    for name, imports, build in rows:
        phases = build["phases_s"]
        cells = [_cell(phases[p]) for p in (*PHASES, "other")]
        total = build["total_s"] + (imports or 0.0)
        print(f"| {name} | {runs} | {_cell(imports)} | " + " | ".join(cells)
              + f" | {total:.2f} | {result['report_bytes'] / 1e6:.1f} |")
    cli = result["cli"]
    print(f"\n`python -m finetune report` end to end (new interpreter, overlays on): "
          f"{cli['wall_s']:.2f} s, rc {cli['rc']}, "
          f"report says why the overlay grid is missing: {cli['overlay_note']}")
    figures = child["builds"][-1]["figures_s"]
    if figures:
        print("figures (last build): " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))
    print("import self time by package: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in result["import_breakdown"]))
    print(f"generation: {result['generate_s']:.1f} s, metrics files "
          f"{result['runs_bytes'] / 1e6:.1f} MB; load average before/after: "
          f"{result['load_before']:.2f} / {result['load_after']:.2f}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("numpy", "pandas", "scipy", "matplotlib", "pyarrow", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-report"),
                        help="folder for runs/ and report/ (replaced)")
    parser.add_argument("--inits", type=int, default=len(INITS),
                        help=f"how many of {', '.join(INITS)} (random first)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2, help="warm builds after the cold one")
    parser.add_argument("--skip-generate", action="store_true",
                        help="reuse WORK/runs from an earlier call")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--measure-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.inits <= len(INITS):
        parser.error(f"--inits must lie in 1..{len(INITS)}")
    if args.seeds < 1 or args.epochs < 1 or args.repeats < 0:
        parser.error("--seeds and --epochs must be >= 1, --repeats >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs, out = args.work / "runs", args.work / "report"
    if args.measure_child:
        print(json.dumps(measure_child(runs, out, args.repeats)))
        return 0
    python = sys.executable
    load_before = os.getloadavg()[0]
    begin = time.perf_counter()
    if not args.skip_generate:
        count = generate(runs, INITS[:args.inits], args.budgets, args.seeds, args.epochs)
    else:
        from finetune.run_metrics import METRICS_FILE

        count = sum(1 for _ in runs.rglob(METRICS_FILE))
    generate_s = time.perf_counter() - begin
    print(f"{count} runs in {runs} ({generate_s:.1f} s)", flush=True)

    child_cmd = [python, str(Path(__file__).resolve()), "--work", str(args.work),
                 "--repeats", str(args.repeats), "--measure-child"]
    done = subprocess.run(child_cmd, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return 1
    child = json.loads(done.stdout.strip().splitlines()[-1])
    result: dict[str, Any] = {
        "runs": count, "inits": list(INITS[:args.inits]), "budgets": args.budgets,
        "seeds": args.seeds, "epochs": args.epochs, "generate_s": generate_s,
        "runs_bytes": folder_bytes(runs), "report_bytes": folder_bytes(out),
        "report_files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        "child": child, "cli": time_cli(python, runs, args.work / "report_cli"),
        "import_breakdown": import_breakdown(python), "cores": os.cpu_count(),
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "versions": versions(), "command": " ".join(sys.argv),
    }
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
