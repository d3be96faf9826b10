"""Wall time of each step of the reference study, derived from a benchmark suite run.

Reads the JSON that ``benchmarks/run.py`` writes (``benchmarks/results/*.json``) and
turns its measured rates into the time each step of the shipped recipes
(``configs/reference_study/``) takes on that hardware, one device:

- pretraining: epochs x pretraining images, at the real data path's views/s of the
  ResNet-50 stage, scaled by the measured cost of one pass per view (the recipes'
  ``view_batchnorm=separate``; the stage's real path runs both views at once);
- fine-tuning: the suite's projection of one run (150 epochs of 1,498 samples plus
  validation), with the best measured packing of runs on one device, times the trials
  of each sweep file.

Epochs and trial counts are read from the recipes themselves.

Only a ``--gpu`` suite run describes the study's sizes (224 px, batch 256 pretraining,
batch 192 fine-tuning, bf16, compiled); a CPU run's figures come from small images and
say little about a GPU. Example::

    python benchmarks/study_time.py benchmarks/results/20261201-040507-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "reference_study"
PRETRAIN_RECIPES = ("pretrain_byol_acdc.yaml", "pretrain_byol_imagenet_acdc.yaml",
                    "pretrain_supervised_imagenet_byol_acdc.yaml")
SWEEP_RECIPES = ("sweep_grid.yaml", "sweep_pretraining_length.yaml")


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / name).read_text())


def sweep_runs(sweep: dict[str, Any]) -> int:
    """Trials of a sweep file: inits (an epochs series counts each epoch) x budgets x seeds."""
    inits = sum(len(value["epochs"]) if isinstance(value, dict) else 1
                for value in sweep["inits"].values())
    return inits * len(sweep["budgets"]) * len(sweep["seeds"])


def study_steps(suite: dict[str, Any], pretrain_images: int) -> list[dict[str, Any]]:
    """One row per recipe: the rate it runs at, and hours on one device."""
    figures = suite["figures"]
    rows: list[dict[str, Any]] = []
    pretrain = figures.get("pretrain_resnet50")
    if pretrain:
        separate = pretrain.get("separate_over_joint")
        views_per_s = pretrain["real_views_per_s"] * (separate or 1.0)
        note = ("one pass per view measured" if separate else
                "one pass per view not measured by this run: joint rate used")
        for name in PRETRAIN_RECIPES:
            epochs = _recipe(name)["optim"]["epochs"]
            seconds = epochs * pretrain_images * 2 / views_per_s
            rows.append({"step": f"{name}, {epochs} epochs",
                         "rate": f"{views_per_s:.0f} views/s", "hours": seconds / 3600,
                         "note": note})
    finetune = figures.get("finetune")
    if finetune:
        best = min(finetune["projection"], key=lambda row: row["gpu_hours"])
        per_run = best["gpu_hours"] / finetune["settings"]["grid_runs"]
        for name in SWEEP_RECIPES:
            runs = sweep_runs(_recipe(name))
            rows.append({"step": f"{name}, {runs} runs", "rate": f"{per_run * 60:.1f} min/run",
                         "hours": per_run * runs, "note": f"{best['packed']} run(s) at once"})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a suite JSON of benchmarks/run.py")
    parser.add_argument("--pretrain-images", type=int, default=22000,
                        help="pretraining slices per epoch (a prepared dataset's manifest "
                        "says: pretrain_slices; ACDC's training cine frames: about 22,000)")
    args = parser.parse_args(argv)
    suite = json.loads(Path(args.results).read_text())
    rows = study_steps(suite, args.pretrain_images)
    print(f"reference study on {suite['hardware']} ({suite['profile']} sizes, commit "
          f"{suite['commit']}, {suite['date']}), one device, {args.pretrain_images} "
          "pretraining images per epoch\n")
    print("| step | measured rate | hours | note |")
    print("|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['step']} | {row['rate']} | {row['hours']:.1f} | {row['note']} |")
    return rows


if __name__ == "__main__":
    main()
