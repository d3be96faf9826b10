"""The study report's figures, with one colour per initialisation across all of them.

Each function takes the tables of :mod:`finetune.report_stats` (or the runs table) and
writes one PNG atomically. A reader compares figures side by side, so an
initialisation keeps its colour and marker everywhere, the baseline drawn first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.colors import ListedColormap

from cluster.atomic import atomic_path

_MARKERS = "osDPX*hpd8"  # no triangles: labels_needed uses them for bounds


class Palette:
    """A fixed colour and marker per initialisation: the baseline first, then by name."""

    def __init__(self, inits: Sequence[str], baseline: str | None = None) -> None:
        ordered = sorted(set(inits), key=lambda name: (name != baseline, name))
        # the qualitative maps are ListedColormaps: a fixed list of colours
        cmap = cast(ListedColormap, plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20"))
        colours = [tuple(float(c) for c in colour) for colour in cast(list, cmap.colors)]
        self.order = ordered
        self._style = {name: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)])
                       for i, name in enumerate(ordered)}

    def colour(self, init: str) -> tuple[float, ...]:
        return self._style[init][0]

    def marker(self, init: str) -> str:
        return self._style[init][1]


def amount(count: float, unit: str) -> str:
    """'1 slice', '30 slices', '1 patient'."""
    return f"{count:g} {unit.removesuffix('s') if count == 1 else unit}"


def budget_axis(axis: matplotlib.axis.Axis, budgets: Sequence[float]) -> None:
    """A log axis labelled with the sweep's own budgets in plain numbers."""
    axis.set_major_locator(ticker.FixedLocator(sorted(set(budgets))))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def ratio_axis(axis: matplotlib.axis.Axis, values: np.ndarray) -> None:
    """A log axis of ratios ticked at powers of two around 1 (0.5x, 1x, 2x, 4x ...)."""
    finite = values[np.isfinite(values) & (values > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.5, 2.0)
    exponents = range(int(np.floor(np.log2(min(low, 1.0)))),
                      int(np.ceil(np.log2(max(high, 1.0)))) + 1)
    axis.set_major_locator(ticker.FixedLocator([2.0 ** e for e in exponents]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.set_minor_formatter(ticker.NullFormatter())


def save(figure: plt.Figure, path: Path,
         rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (within ``rect``: room left for a figure legend) and write atomically."""
    figure.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def dice_vs_budget(runs: pd.DataFrame, palette: Palette, unit: str, path: Path) -> Path:
    """Mean test Dice per budget (line) over every seed's value (dots): the spread is
    the data itself, not a model of it."""
    figure, ax = plt.subplots(figsize=(7.2, 4.6))
    present = [init for init in palette.order if (runs["init"] == init).any()]
    nudges = np.linspace(-0.04, 0.04, max(len(present), 1))
    for nudge, init in zip(nudges, present):
        own = runs[runs["init"] == init]
        colour, marker = palette.colour(init), palette.marker(init)
        # each init's seed dots sit a little beside the budget, so columns do not merge
        ax.scatter(own["budget"] * 10 ** nudge, own["test_dice"], color=colour, alpha=0.35,
                   s=14, marker=marker, linewidths=0)
        means = own.groupby("budget")["test_dice"].mean()
        ax.plot(means.index, means.values, color=colour, marker=marker, label=init)
    ax.set_xscale("log")
    budget_axis(ax.xaxis, runs["budget"])
    ax.set_xlabel(f"label budget (annotated training {unit}, log scale)")
    ax.set_ylabel("test Dice (volumes, mean over classes)")
    ax.set_title("Accuracy against label budget (line: mean; dots: seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return save(figure, path)


def validation_curves(curves: pd.DataFrame, palette: Palette, unit: str, path: Path) -> Path:
    """Validation Dice per epoch, one panel per budget: median over seeds and the
    inter-quartile band. ``curves``: init, budget, seed, epoch, val_dice."""
    budgets = sorted(curves["budget"].unique())
    columns = min(len(budgets), 4)
    rows = -(-len(budgets) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows),
                                squeeze=False, sharey=True)
    for ax, budget in zip(axes.flat, budgets):
        for init in palette.order:
            own = curves[(curves["budget"] == budget) & (curves["init"] == init)]
            if own.empty:
                continue
            by_epoch = own.groupby("epoch")["val_dice"]
            median, low, high = by_epoch.median(), by_epoch.quantile(0.25), \
                by_epoch.quantile(0.75)
            ax.plot(median.index, median.values, color=palette.colour(init), label=init)
            ax.fill_between(median.index, low.values, high.values, color=palette.colour(init),
                            alpha=0.15, linewidth=0)
        ax.set_title(amount(budget, unit))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation Dice")
    for ax in list(axes.flat)[len(budgets):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    figure.suptitle("Validation Dice (median over seeds, band: inter-quartile range)")
    return save(figure, path, rect=(0, 0.06 if rows == 1 else 0.035, 1, 1))


def speedups(table: pd.DataFrame, palette: Palette, baseline: str, unit: str,
             path: Path) -> Path:
    """Speed-up factor to 95% of best validation Dice per budget, median with interval.
    ``table``: init, budget, median_ratio, ci_low, ci_high."""
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    inits = [i for i in palette.order if i in set(table["init"])]
    offsets = np.linspace(-0.06, 0.06, max(len(inits), 1))
    for offset, init in zip(offsets, inits):
        own = table[table["init"] == init].sort_values("budget")
        x = own["budget"].to_numpy(float) * 10 ** offset  # nudged apart on the log axis
        y = own["median_ratio"].to_numpy(float)
        low = y - own["ci_low"].to_numpy(float)
        high = own["ci_high"].to_numpy(float) - y
        ax.errorbar(x, y, yerr=np.nan_to_num(np.vstack([low, high])), color=palette.colour(init),
                    marker=palette.marker(init), capsize=3, label=init, linestyle="-")
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    budget_axis(ax.xaxis, table["budget"])
    ratio_axis(ax.yaxis, table[["median_ratio", "ci_low", "ci_high"]].to_numpy(float))
    ax.set_xlabel(f"label budget ({unit}, log scale)")
    ax.set_ylabel(f"× faster than {baseline} (log scale)")
    ax.set_title("Epochs to 95% of best validation Dice: speed-up, median over seeds")
    ax.grid(alpha=0.3, which="both")
    if inits:
        ax.legend(fontsize=8)
    return save(figure, path)


def labels_needed(table: pd.DataFrame, palette: Palette, unit: str,
                  budgets: Sequence[float], path: Path) -> Path:
    """Labels each initialisation needs to reach each target test Dice. Filled markers:
    interpolated; a hollow downward triangle: at most the smallest budget; a hollow
    upward triangle at the top: not reached within the largest budget. ``table``:
    init, target, labels, status."""
    targets = sorted(table["target"].unique())
    inits = [i for i in palette.order if i in set(table["init"])]
    low, high = min(budgets), max(budgets)
    figure, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(targets)), 4.2))
    width = 0.6 / max(len(inits), 1)
    for k, init in enumerate(inits):
        own = table[table["init"] == init].set_index("target")
        for t, target in enumerate(targets):
            x = t + (k - (len(inits) - 1) / 2) * width
            status = own["status"].get(target)
            labels = own["labels"].get(target, np.nan)
            colour = palette.colour(init)
            label = init if t == 0 else None
            if status == "interpolated":
                ax.plot(x, labels, marker=palette.marker(init), color=colour, linestyle="",
                        markersize=8, label=label)
            elif np.isfinite(labels):  # at or below the smallest budget: an upper bound
                ax.plot(x, labels, marker="v", markerfacecolor="none", color=colour,
                        linestyle="", markersize=9, label=label)
            else:
                ax.plot(x, high * 1.6, marker="^", markerfacecolor="none", color=colour,
                        linestyle="", markersize=9, label=label)
    ax.axhline(high * 1.25, color="grey", linewidth=0.8, linestyle=":")
    ax.text(len(targets) - 0.5, high * 1.3, "not reached above this line", ha="right",
            va="bottom", fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set_ylim(low / 1.6, high * 2.6)
    budget_axis(ax.yaxis, budgets)
    ax.set_xticks(range(len(targets)), [f"Dice {t:.2f}" for t in targets])
    ax.set_xlim(-0.6, len(targets) - 0.4)
    ax.set_ylabel(f"{unit} needed (log scale)")
    ax.set_title("Labels needed to reach a test Dice (▽: at most; △: not reached)")
    ax.grid(alpha=0.3, axis="y")
    if inits:
        ax.legend(fontsize=8)
    return save(figure, path)


def pretraining_length(table: pd.DataFrame, path: Path, unit: str) -> Path:
    """Test Dice and epochs to 95% against pretraining epochs, a line per budget.
    ``table``: series, pretrain_epochs, budget, test_dice_mean, epochs_to_95pct_mean."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    budgets = sorted(table["budget"].unique())
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(budgets), 1)))
    for colour, budget in zip(colours, budgets):
        for series, own in table[table["budget"] == budget].groupby("series"):
            own = own.sort_values("pretrain_epochs")
            label = f"{budget} {unit}" + (f" ({series})" if table["series"].nunique() > 1
                                          else "")
            axes[0].plot(own["pretrain_epochs"], own["test_dice_mean"], marker="o", color=colour,
                         label=label)
            axes[1].plot(own["pretrain_epochs"], own["epochs_to_95pct_mean"], marker="o",
                         color=colour, label=label)
    for ax, ylabel in zip(axes, ("test Dice (mean over seeds)",
                                 "fine-tuning epochs to 95% of best")):
        ax.set_xscale("log")
        budget_axis(ax.xaxis, table["pretrain_epochs"])
        ax.set_xlabel("pretraining epochs (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    figure.suptitle("How much pretraining is enough")
    return save(figure, path)


def probe_curve(curves: pd.DataFrame, length: pd.DataFrame, path: Path, unit: str) -> Path:
    """The live probe's Dice over pretraining (left) and against the downstream test Dice
    at each kept epoch, a colour per budget (right). ``curves``: series, epoch, dice;
    ``length``: series, pretrain_epochs, budget, test_dice_mean."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for series, own in curves.groupby("series"):
        own = own.sort_values("epoch")
        axes[0].plot(own["epoch"], own["dice"], marker=".", label=series)
    axes[0].set_xlabel("pretraining epoch")
    axes[0].set_ylabel("probe volume Dice (validation)")
    axes[0].legend(fontsize=7)
    budgets = sorted(length["budget"].unique())
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(budgets), 1)))
    for colour, budget in zip(colours, budgets):
        for series, own in length[length["budget"] == budget].groupby("series"):
            probe = curves[curves["series"] == series].set_index("epoch")["dice"]
            own = own[own["pretrain_epochs"].isin(probe.index)]
            axes[1].scatter(probe.loc[own["pretrain_epochs"]], own["test_dice_mean"],
                            color=colour, label=amount(budget, unit))
    axes[1].set_xlabel("probe Dice at the kept epoch")
    axes[1].set_ylabel("downstream test Dice (mean over seeds)")
    handles, labels = axes[1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.suptitle("Live segmentation probe during pretraining")
    return save(figure, path)
