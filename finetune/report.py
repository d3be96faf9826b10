"""The study report: which initialisation, how many labels, how much pretraining.

``python -m finetune report PATH`` (PATH: a sweep folder or any folder of run folders;
also run at the end of every sweep and by ``medssl demo``) writes into ``--out``
(default ``PATH/report``): ``report.html`` (self-contained) and ``report.md`` with the
same content, the figures as PNG, and every table as CSV and parquet under ``tables/``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cluster.atomic import atomic_path, atomic_write_text
from cluster.storage import is_url, join
from cluster.storage.mirror import FolderMirror, local_folder_for
from data_prep.manifest import Manifest
from finetune import report_figures as figures
from finetune import report_findings as findings
from finetune import report_stats as stats
from finetune.report_data import StudyRuns, load_study, probe_curves
from finetune.report_page import Block, Bullets, Figure, Heading, Paragraph, Table, write_pages

DEFAULT_TARGETS = (0.5, 0.7, 0.8)
ALPHA = 0.05


@dataclass
class ReportSettings:
    baseline: str | None = None  # None: the sweep's, else "random"
    targets: Sequence[float] | None = None  # label-efficiency targets; None: the sweep's
    resamples: int = stats.DEFAULT_RESAMPLES
    overlays: int = 4  # test slices in the qualitative grid (0: none)
    title: str = ""
    notes: list[str] = field(default_factory=list)


def build_report(path: str | Path, out: str | Path | None = None,
                 settings: ReportSettings | None = None) -> Path:
    """Write the report on the runs under ``path``; return ``report.html``'s path."""
    settings = settings or ReportSettings()
    study = load_study(path)
    if study.frame.empty:
        raise ValueError(f"{path}: no complete fine-tuning runs to report on"
                         + (f" ({len(study.unfinished)} unfinished)" if study.unfinished
                            else ""))
    out = Path(out) if out is not None else Path(path) / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    baseline, baseline_note = _baseline(study, settings)
    targets = list(settings.targets or (study.sweep or {}).get("label_targets")
                   or DEFAULT_TARGETS)
    unit = str(study.frame["budget_unit"].iloc[0])
    tables = _tables(study, baseline, targets, settings.resamples)
    for name, table in tables.items():
        write_table(out / "tables" / name, table)
    blocks = _page(study, tables, baseline, baseline_note, targets, unit, out, settings)
    title = settings.title or (f"medssl study report: {study.sweep['name']}" if study.sweep
                               else "medssl study report")
    _, page = write_pages(out, title, blocks)
    return page


def publish_report(path: str | Path, out: str | Path | None = None,
                   settings: ReportSettings | None = None) -> str:
    """``build_report`` for runs and an output anywhere: a report on runs in an object
    store (or into one) is built in a node-local folder and uploaded; returns the page's
    path or URL. Reading needs nothing but the store: no file system is shared."""
    target = str(out) if out is not None else join(path, "report")
    if not is_url(target):
        return str(build_report(path, target, settings).resolve())
    staging = local_folder_for(target)
    shutil.rmtree(staging, ignore_errors=True)
    page = build_report(path, staging, settings)
    FolderMirror(staging, target).push()
    return join(target, page.name)


def _baseline(study: StudyRuns, settings: ReportSettings) -> tuple[str, str]:
    inits = sorted(study.frame["init"].unique())
    wanted = settings.baseline or (study.sweep or {}).get("baseline") or stats.DEFAULT_BASELINE
    if wanted in inits:
        return wanted, ""
    if settings.baseline is not None:
        raise ValueError(f"baseline {wanted!r} is not among the runs' initialisations "
                         f"({', '.join(inits)})")
    return inits[0], (f"The baseline `{wanted}` has no runs here; comparisons use "
                      f"`{inits[0]}` instead.")


def _tables(study: StudyRuns, baseline: str, targets: list[float],
            resamples: int) -> dict[str, pd.DataFrame]:
    runs = study.frame
    one_init = runs["init"].nunique() == 1
    tables = {
        "runs": runs,
        "accuracy": stats.summary_table(runs, stats.accuracy_columns(runs), resamples=resamples),
        "convergence": stats.summary_table(runs, stats.convergence_columns(runs),
                                           resamples=resamples),
        "curves": _curves(study),
    }
    if not one_init:
        tables["speedup"] = pd.concat([
            stats.speedup_table(runs, baseline, measure, resamples=resamples)
            for measure in ("epochs_to_95pct", "steps_to_95pct")], ignore_index=True)
        # Holm within each budget: one family per budget and metric (a family over the
        # whole grid could never reject with 10 seeds: 2/2**10 > 0.05/50)
        tables["tests"] = pd.concat([
            stats.paired_tests(runs, baseline, metric, alpha=ALPHA, family_by=("budget",))
            for metric in ("test_dice", "epochs_to_95pct")], ignore_index=True)
        tables["label_efficiency"] = stats.label_efficiency_table(runs, baseline, targets)
    if runs["pretrain_epochs"].notna().any():
        length = stats.pretraining_length_table(runs, resamples=resamples)
        if not length.empty:
            tables["pretraining_length"] = length
            curves = probe_curves(study.metrics)
            if not curves.empty:  # the series' pretraining run had the live probe on
                tables["probe_curve"] = curves
                tables["probe_agreement"] = stats.probe_agreement(length, curves)
    return tables


def _curves(study: StudyRuns) -> pd.DataFrame:
    rows = [{"init": m.init, "budget": m.budget, "seed": m.seed,
             "epoch": e.epoch, "val_dice": e.val_dice}
            for m in study.metrics for e in m.validated_epochs]
    return pd.DataFrame(rows)


def write_table(stem: Path, table: pd.DataFrame) -> None:
    """``STEM.csv`` and ``STEM.parquet``, each written atomically."""
    atomic_write_text(stem.with_name(f"{stem.name}.csv"), table.to_csv(index=False))
    with atomic_path(stem.with_name(f"{stem.name}.parquet")) as tmp:
        table.to_parquet(tmp, index=False)


# --- the page ---------------------------------------------------------------------------

def _page(study: StudyRuns, tables: dict[str, pd.DataFrame], baseline: str,
          baseline_note: str, targets: list[float], unit: str, out: Path,
          settings: ReportSettings) -> list[Block]:
    runs = study.frame
    palette = figures.Palette(runs["init"].unique(), baseline)
    blocks: list[Block] = [Paragraph(text) for text in settings.notes]
    blocks += _overview(study, baseline, unit, baseline_note)
    blocks += _findings(tables, baseline, unit)
    if study.unfinished:
        blocks += [Heading("Unfinished runs"),
                   Paragraph(f"{len(study.unfinished)} runs did not finish and are left out "
                             "of every table and figure:"),
                   Bullets([f"`{u.run_dir}`: {u.why}" for u in study.unfinished])]
    blocks += [Heading("Accuracy against label budget"),
               Figure(figures.dice_vs_budget(runs, palette, unit, out / "dice_vs_budget.png"),
                      "Test Dice against label budget: mean over seeds (line), each seed "
                      "(dots)."),
               Table(_accuracy_view(tables["accuracy"], ("test_dice", "test_iou",
                                                         "test_hd95_mm")),
                     "Test metrics on 3D volumes, best validation epoch: mean [95% bootstrap "
                     "interval over seeds] (n runs). HD95 in mm."),
               Table(_accuracy_view(tables["accuracy"], [
                   c for c in runs.columns if c.startswith("test_dice_")]),
                   "Test Dice per class: mean [95% bootstrap interval] (n).")]
    blocks += [Heading("Convergence"),
               Figure(figures.validation_curves(tables["curves"], palette, unit,
                                                out / "val_dice_curves.png"),
                      "Validation Dice against epoch per budget: median over seeds, "
                      "inter-quartile band."),
               Table(_accuracy_view(tables["convergence"], [
                   "epochs_to_95pct", "steps_to_95pct", "seconds_to_95pct", "epochs_to_99pct",
                   "normalised_auc", *[c for c in runs.columns if c.startswith(
                       stats.DICE_TARGET_PREFIX)]]),
                   "Epochs, optimizer steps and seconds to first reach 95% / 99% of each "
                   "run's best validation Dice, epochs to reach fixed Dice targets, and the "
                   "area under the validation curve normalised by epochs: mean [95% bootstrap "
                   "interval] (n runs where defined / runs). Per run: `tables/runs.csv`.")]
    if "speedup" in tables:
        blocks += _comparisons(tables, palette, baseline, targets, unit, out)
    if "pretraining_length" in tables:
        blocks += [Heading("How much pretraining is enough"),
                   Figure(figures.pretraining_length(tables["pretraining_length"],
                                                     out / "pretraining_length.png", unit),
                          "Downstream test Dice and fine-tuning epochs to 95% against "
                          "pretraining epochs."),
                   Table(_length_view(tables["pretraining_length"]),
                         "Mean over seeds [95% bootstrap interval] (n); no trend test.")]
    if "probe_curve" in tables:
        blocks += [Figure(figures.probe_curve(tables["probe_curve"],
                                              tables["pretraining_length"],
                                              out / "probe_curve.png", unit),
                          "The pretraining run's live segmentation probe (a light head on "
                          "the frozen encoder, validation volume Dice), and against the "
                          "downstream test Dice after each kept epoch."),
                   Table(_agreement_view(tables["probe_agreement"], unit),
                         "Spearman's rank correlation between the probe Dice at each kept "
                         "pretraining epoch and the mean downstream test Dice after it (n "
                         "epochs); blank where fewer than 3 epochs pair up.")]
    if settings.overlays:
        from finetune.report_overlays import overlay_grid  # torch and the U-Net: only here

        grid = overlay_grid(study.metrics, palette, out / "overlays.png", settings.overlays)
        blocks += [Heading("Predictions at the smallest budget")]
        blocks += [Figure(grid, "Test slices with the most foreground: image, ground truth and "
                                "each initialisation's prediction (its lowest seed's best "
                                "weights).")] if grid else [
            Paragraph("Not drawn: the dataset or the runs' weights are not at their "
                      "recorded paths.")]
    blocks += _methods(baseline)
    return blocks


def _overview(study: StudyRuns, baseline: str, unit: str, note: str) -> list[Block]:
    runs = study.frame
    blocks: list[Block] = [Heading("Study")]
    counts = runs.groupby(["init", "budget"]).size()
    blocks.append(Paragraph(
        f"{len(runs)} complete fine-tuning runs: {runs['init'].nunique()} initialisations "
        f"({', '.join(f'`{i}`' for i in sorted(runs['init'].unique()))}) × "
        f"{runs['budget'].nunique()} label budgets "
        f"({', '.join(str(b) for b in sorted(runs['budget'].unique()))} {unit}) × seeds "
        f"({counts.min()}–{counts.max()} per cell). Baseline for comparisons: `{baseline}`."))
    if note:
        blocks.append(Paragraph(note))
    data = study.data
    try:
        manifest = Manifest.read(data) if data else None
    except (OSError, ValueError):  # OSError: also an object store that is not reachable
        manifest = None
    if manifest is not None:
        splits = ", ".join(f"{name} {len(patients)}" for name, patients in
                           manifest.splits.items())
        blocks.append(Paragraph(f"Dataset `{manifest.name}` (`{data}`): patients per split: "
                                f"{splits}; classes: {', '.join(manifest.class_names)}."))
    else:
        blocks.append(Paragraph(f"Dataset `{data}` (its manifest is not readable here)."))
    if study.sweep is not None:
        shown = {k: study.sweep[k] for k in ("name", "data", "base", "inits", "budgets",
                                             "seeds", "resources", "baseline") if k in study.sweep}
        blocks.append(Bullets([f"`{key}`: `{_flow(value)}`" for key, value in shown.items()]))
    return blocks


def _flow(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # YAML's end-of-document mark after a scalar


def _findings(tables: dict[str, pd.DataFrame], baseline: str, unit: str) -> list[Block]:
    sentences: list[str] = []
    if "tests" in tables:
        tests = tables["tests"]
        speed = tests[tests["metric"] == "epochs_to_95pct"]
        dice = tests[tests["metric"] == "test_dice"]
        epochs = tables["speedup"][tables["speedup"]["measure"] == "epochs_to_95pct"]
        sentences += findings.speed_findings(speed, epochs, baseline, unit)
        sentences += findings.accuracy_findings(dice, baseline, unit)
        sentences += findings.untested_findings(dice, baseline, ALPHA)
        sentences += findings.label_findings(tables["label_efficiency"], baseline, unit)
    if "pretraining_length" in tables:
        sentences += findings.pretraining_findings(tables["pretraining_length"], unit)
    if "probe_agreement" in tables:
        sentences += findings.probe_findings(tables["probe_agreement"], unit)
    if not sentences:
        sentences = ["One initialisation only: no comparison to make."]
    return [Heading("Findings"), Bullets(sentences)]


def _comparisons(tables: dict[str, pd.DataFrame], palette: figures.Palette, baseline: str,
                 targets: list[float], unit: str, out: Path) -> list[Block]:
    speed = tables["speedup"]
    epochs = speed[speed["measure"] == "epochs_to_95pct"]
    return [
        Heading(f"Against {baseline}"),
        Figure(figures.speedups(epochs, palette, baseline, unit, out / "speedup.png"),
               f"Speed-up to 95% of best validation Dice against {baseline}: median over "
               "seeds of the per-seed ratio, 95% bootstrap interval."),
        Table(_speed_view(speed), "Speed-up factor (baseline ÷ init, > 1: faster), paired "
                                  "by seed: median [95% bootstrap interval] (n pairs)."),
        Table(_tests_view(tables["tests"]),
              "Paired Wilcoxon signed-rank tests against the baseline (pairs: same seed, "
              "same label subset); p adjusted with Holm's method within each budget and "
              "metric."),
        Figure(figures.labels_needed(tables["label_efficiency"], palette, unit,
                                     sorted(tables["runs"]["budget"].unique()),
                                     out / "labels_needed.png"),
               f"Labels needed to reach test Dice {', '.join(f'{t:.2f}' for t in targets)}."),
        Table(_labels_view(tables["label_efficiency"]),
              "Labels needed, from the mean test-Dice curve, interpolated on the log-budget "
              "axis; ratio = baseline's labels ÷ init's (> 1: fewer labels)."),
    ]


def _methods(baseline: str) -> list[Block]:
    return [Heading("How these numbers are made"), Bullets([
        "Intervals: percentile bootstrap over seeds (10,000 resamples, seeded), none for "
        "fewer than 2 runs; they describe spread, claims rest on the paired tests.",
        f"Paired tests: Wilcoxon signed-rank on init − {baseline} per seed (zero "
        "differences dropped; exact p without ties, exact sign-flip enumeration with ties "
        "up to 16 pairs, else the normal approximation); Holm's correction within each "
        "budget and metric, which controls the family-wise error per budget, not over the "
        "whole grid. With fewer than 6 differing pairs no p < 0.05 is attainable: such "
        "comparisons are marked untestable.",
        "Speed-up: median over seeds of the baseline's epochs (steps) to 95% of best ÷ the "
        "init's; pairs with an undefined value are dropped.",
        "Label efficiency: the first crossing of the target on the mean test-Dice curve, "
        "linear in log(budget) between measured budgets; a curve already above the target "
        "at the smallest budget gives an upper bound, one that never reaches it a lower "
        "bound on the labels, and ratios built from bounds are bounds.",
        "Means of epochs to a Dice target cover only the runs that reached it (n / runs).",
    ])]


# --- table views: every cell a string ---------------------------------------------------

def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else "–"


def _digits(metric: str) -> int:
    if metric.startswith(("steps", "seconds")):
        return 0
    if metric.startswith(("epochs", "best_epoch")) or "hd95" in metric:
        return 1
    return 3


def _cell(row: pd.Series, digits: int) -> str:
    if row["n"] == 0:
        return "–"
    interval = (f" [{_num(row['ci_low'], digits)}, {_num(row['ci_high'], digits)}]"
                if math.isfinite(row["ci_low"]) else "")
    count = f"{row['n']}" if row["n"] == row["n_runs"] else f"{row['n']}/{row['n_runs']}"
    return f"{_num(row['mean'], digits)}{interval} ({count})"


def _accuracy_view(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    chosen = summary[summary["metric"].isin(metrics)]
    view = chosen.assign(cell=[_cell(row, _digits(row["metric"]))
                               for _, row in chosen.iterrows()])
    wide = view.pivot_table(index=["init", "budget"], columns="metric", values="cell",
                            aggfunc="first")
    ordered = [m for m in metrics if m in wide.columns]
    wide = wide[ordered].reset_index()
    wide.columns = [_label(c) for c in wide.columns]
    return wide.astype(str)


def _label(column: str) -> str:
    return column.replace("test_", "").replace("_", " ")


def _speed_view(speed: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in speed.sort_values(["measure", "init", "budget"]).itertuples():
        interval = (f" [{_num(row.ci_low, 2)}, {_num(row.ci_high, 2)}]"
                    if math.isfinite(row.ci_low) else "")
        rows.append({"measure": _label(row.measure), "init": row.init,
                     "budget": str(row.budget),
                     "speed-up": f"{_num(row.median_ratio, 2)}{interval} ({row.n_pairs})"})
    return pd.DataFrame(rows)


def _tests_view(tests: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in tests.sort_values(["metric", "init", "budget"]).itertuples():
        rows.append({
            "metric": _label(row.metric), "init": row.init, "budget": str(row.budget),
            "pairs": str(row.n_pairs),
            "median difference": _num(row.median_difference, _digits(row.metric) or 1),
            "p": _num(row.p, 4) if row.testable else "–",
            "p (Holm)": _num(row.p_holm, 4) if row.testable else "–",
            "supported": "yes" if row.significant else "no",
            "note": row.note or "",
        })
    return pd.DataFrame(rows)


def _labels_view(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in table.sort_values(["target", "init"]).itertuples():
        labels = _num(row.labels, 1) if np.isfinite(row.labels) else "–"
        ratio = "–" if not np.isfinite(row.ratio) else _num(row.ratio, 2)
        rows.append({"target Dice": _num(row.target, 2), "init": row.init,
                     "labels": labels, "status": row.status, "ratio": ratio,
                     "ratio is": row.ratio_kind})
    return pd.DataFrame(rows)


def _length_view(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in table.sort_values(["series", "budget", "pretrain_epochs"]).itertuples():
        dice = (f"{_num(row.test_dice_mean)} [{_num(row.test_dice_ci_low)}, "
                f"{_num(row.test_dice_ci_high)}] ({row.test_dice_n})")
        epochs = f"{_num(row.epochs_to_95pct_mean, 1)} ({row.epochs_to_95pct_n})"
        rows.append({"series": row.series, "budget": str(row.budget),
                     "pretraining epochs": str(int(row.pretrain_epochs)),
                     "test Dice": dice, "epochs to 95%": epochs})
    return pd.DataFrame(rows)


def _agreement_view(table: pd.DataFrame, unit: str) -> pd.DataFrame:
    rows = [{"series": row.series, "budget": figures.amount(row.budget, unit), "n": str(row.n),
             "Spearman ρ": "" if math.isnan(row.spearman) else f"{row.spearman:.2f}",
             "p": "" if math.isnan(row.p_value) else f"{row.p_value:.3g}"}
            for row in table.itertuples()]
    return pd.DataFrame(rows)
