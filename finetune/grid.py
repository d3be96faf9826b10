"""A grid of fine-tuning runs (initialisation x label budget x seed), run one after another
in this process. Ray Tune sweeps run the same ``train_run`` across a cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cluster.storage import join
from finetune.config import FinetuneConfig
from finetune.train import train_run


def run_dir_for(runs_dir: str | Path, init_name: str, budget: int, seed: int,
                unit: str = "slices") -> str:
    """The run folder (a path or a URL) of one grid cell below ``runs_dir``."""
    budget_folder = f"budget{budget:05d}" if unit == "slices" else f"{unit}{budget:04d}"
    return join(runs_dir, init_name, budget_folder, f"seed{seed}")


def run_grid(base: FinetuneConfig, inits: dict[str, str], budgets: list[int], seeds: list[int],
             runs_dir: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (init, budget, seed) combination; finished runs are not repeated."""
    combos = [(name, path, budget, seed) for name, path in inits.items()
              for budget in budgets for seed in seeds]
    results = []
    for name, path, budget, seed in tqdm(combos, desc="fine-tuning grid", unit="run",
                                         disable=not progress):
        config = dataclasses.replace(
            base, init=path, init_name=name, budget=budget, seed=seed,
            out=run_dir_for(runs_dir, name, budget, seed, base.budget_unit),
            progress=progress,
        )
        results.append(train_run(config))
    return results
