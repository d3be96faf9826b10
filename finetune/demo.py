"""``medssl demo``: the whole workflow on the built-in synthetic phantom, on CPU, in minutes.

generate phantom -> prepare dataset -> BYOL pretraining -> fine-tune {random, SSL} x
{2 label budgets} x {2 seeds} as a Ray Tune sweep on a local Ray instance -> the study
report (``out/sweep/report/report.html``, written by the sweep).
Every artifact lands under ``--out``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.phantom import PhantomConfig, write_acdc_tree
from data_prep.prepare import PrepareConfig, prepare_dataset
from finetune.report import ReportSettings
from finetune.sweep import run_sweep
from finetune.sweep_config import SweepConfig, load_sweep_config
from pretrain.config import (
    AugmentConfig,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    ViewConfig,
)
from pretrain.engine import pretrain


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0
    patients: int = 20
    image_size: int = 64
    arch: str = "resnet18"
    cine_frame_stride: int = 2
    pretrain_epochs: int = 3
    pretrain_batch: int = 64
    crop_size: int = 32
    finetune_epochs: int = 10
    finetune_batch: int = 8
    epoch_samples: int = 64
    budgets: list[int] = field(default_factory=lambda: [8, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    workers: int = 1
    trial_cpus: int = 1  # CPUs per fine-tuning trial: 2 cores run two trials at once
    progress: bool = True


def run_demo(config: DemoConfig) -> Path:
    out = Path(config.out)
    started = time.perf_counter()

    def _stage(title: str) -> None:
        minutes, seconds = divmod(int(time.perf_counter() - started), 60)
        print(f"\n[{minutes:02d}:{seconds:02d}] {title}", flush=True)

    _stage(f"1/5 synthetic cardiac phantom: {config.patients} patients")
    raw = out / "phantom_acdc"
    write_acdc_tree(raw, config.patients, seed=config.seed,
                    config=PhantomConfig.for_image_size(config.image_size),
                    progress=config.progress)

    _stage("2/5 prepare: shards, zarr store, patient-level splits")
    prepared = out / "prepared"
    prepare_dataset(PrepareConfig(
        source=str(raw), out=str(prepared), name="phantom", image_size=config.image_size,
        cine_frame_stride=config.cine_frame_stride, min_shards=max(2, 2 * config.workers),
    ), progress=config.progress)

    _stage(f"3/5 BYOL pretraining of {config.arch}")
    pretrain_run = out / "pretrain"
    result = pretrain(PretrainConfig(
        data=DataConfig(path=str(prepared), crop_size=config.crop_size,
                        batch_size=config.pretrain_batch, workers=config.workers,
                        shuffle_buffer=256),
        model=ModelConfig(arch=config.arch, in_chans=1),
        augment=AugmentConfig(view1=ViewConfig(scale=(0.3, 1.0)),
                              view2=ViewConfig(scale=(0.3, 1.0), noise_std=0.1)),
        method=MethodConfig(projector_hidden=512, projection_dim=128),
        optim=OptimConfig(lr=2e-3, epochs=config.pretrain_epochs, warmup_epochs=0.5),
        run=RunConfig(out=str(pretrain_run), seed=config.seed, device="cpu",
                      progress=config.progress),
    ))

    _stage("4/5 fine-tuning sweep on a local Ray instance: {random, SSL} x budgets x seeds")
    sweep = demo_sweep(config, prepared, result.export_dir)
    minutes = (time.perf_counter() - started) / 60
    outcome = run_sweep(sweep, report=ReportSettings(
        title="medssl demo: synthetic cardiac phantom",
        notes=[f"Made by `medssl demo` on CPU: {config.patients} phantom patients at "
               f"{config.image_size} px, {config.arch} BYOL for {config.pretrain_epochs} "
               f"epochs ({minutes:.1f} min up to the sweep), {config.finetune_epochs} "
               "fine-tuning epochs per run.",
               "The demo is sized to finish in minutes on CPU: it shows the workflow, not "
               "the study's findings, which need real data, longer pretraining, 150-epoch "
               "fine-tuning and at least 6 seeds per budget for a paired test."]))
    if not outcome.results.complete or outcome.report is None:
        raise RuntimeError(f"fine-tuning trials failed: "
                           f"{', '.join(t.key for t in outcome.results.unfinished)}")
    _stage("5/5 report written")
    return Path(outcome.report)


def demo_sweep(config: DemoConfig, prepared: Path, export: Path) -> SweepConfig:
    """The demo's fine-tuning grid as a sweep in ``out/sweep``."""
    return load_sweep_config({
        "name": "sweep", "storage": str(Path(config.out).resolve()), "data": str(prepared),
        "base": {"arch": config.arch, "epochs": config.finetune_epochs,
                 "batch_size": config.finetune_batch, "epoch_samples": config.epoch_samples,
                 "lr": 2e-3, "warmup_epochs": 1.0, "device": "cpu", "overlays": 2,
                 "checkpoint_every": 1},
        "inits": {"random": "random", "byol-phantom": str(export)},
        "budgets": config.budgets, "seeds": config.seeds,
        "resources": {"cpu": config.trial_cpus}, "table_every": 0,
    })
