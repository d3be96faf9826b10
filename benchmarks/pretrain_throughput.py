"""Pretraining throughput: the real data path against a plain step on random tensors.

Three measurements in one process, same model, batch, precision and device:

1. plain   -- the BYOL step (timm encoder, heads, loss, AdamW, EMA) on random tensors
              already on the device: what the model alone can consume;
2. loader  -- the shard loader alone (read + decode in workers), images/s;
3. real    -- shards -> loader -> batched augmentation of two views -> the same step.

It prints views/s (one view = one augmented crop through the encoder), the fraction of
step time spent waiting for data, and the ratios the design targets ask for
(real/plain >= 0.95, loader/consumption >= 1.3). Without ``--data`` it makes a phantom
dataset first. Example (CPU, minutes)::

    python benchmarks/pretrain_throughput.py --arch resnet18 --batch 32 --crop 64

GPU (ResNet-50 BYOL at 224 px, bf16, channels_last, compiled)::

    python benchmarks/pretrain_throughput.py --arch resnet50 --batch 256 --crop 224 \
        --image-size 256 --workers 12 --compile
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from data_prep.phantom import PhantomConfig, write_acdc_tree
from data_prep.prepare import PrepareConfig, prepare_dataset
from pretrain.augment import augment_view
from pretrain.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
)
from pretrain.data import build_loader
from pretrain.engine import build_model
from pretrain.step import byol_step


def make_dataset(work: Path, image_size: int, patients: int) -> Path:
    raw, prepared = work / "phantom_acdc", work / f"prepared_{image_size}"
    if not (prepared / "manifest.json").is_file():
        write_acdc_tree(raw, patients, config=PhantomConfig.for_image_size(image_size))
        prepare_dataset(PrepareConfig(source=str(raw), out=str(prepared), name="phantom",
                                      image_size=image_size, min_shards=32,
                                      pretrain_splits=["train", "val", "test"]),
                        progress=False)
    return prepared


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset (default: make a phantom one)")
    parser.add_argument("--work", default=None, help="folder for the generated dataset")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--projector-hidden", type=int, default=4096)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-bench-"))
    data = Path(args.data) if args.data else make_dataset(work, args.image_size, args.patients)
    config = PretrainConfig(
        data=DataConfig(path=str(data), crop_size=args.crop, batch_size=args.batch,
                        workers=args.workers),
        model=ModelConfig(arch=args.arch, in_chans=1),
        method=MethodConfig(projector_hidden=args.projector_hidden),
        run=RunConfig(out=str(work / "unused"), precision=args.precision,
                      compile=args.compile),
    )
    byol = build_model(config).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        byol = byol.to(memory_format=torch.channels_last)
    trained = torch.compile(byol) if args.compile else byol
    optimizer = torch.optim.AdamW([p for p in byol.parameters() if p.requires_grad], lr=1e-4)
    views_per_step = 2 * args.batch

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        byol_step(trained, byol, optimizer, view1, view2, lr=1e-4, momentum=0.996,
                  precision=args.precision, channels_last=channels_last)

    # 1. plain step on random tensors already on the device
    noise = torch.randn(2, args.batch, 1, args.crop, args.crop, device=device)
    for _ in range(args.warmup):
        step(noise[0], noise[1])
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(noise[0], noise[1])
    synchronize(device)
    plain_s = (time.perf_counter() - start) / args.steps

    # 2. loader alone
    loader = build_loader(str(data), per_rank_batch=args.batch, workers=args.workers,
                          shuffle_buffer=256, seed=0, rank=0,
                          pin_memory=device.type == "cuda")
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    loader_steps = max(args.steps, 20)
    for _ in range(loader_steps):
        next(batches)
    loader_images_per_s = loader_steps * args.batch / (time.perf_counter() - start)

    # 3. the real path: loader -> device -> batched augmentation -> the same step
    generator = torch.Generator(device=device).manual_seed(0)
    wait = 0.0
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            synchronize(device)
            start, wait = time.perf_counter(), 0.0
        fetch = time.perf_counter()
        images = next(batches).to(device, non_blocking=True)
        wait += time.perf_counter() - fetch
        step(augment_view(images, config.augment.view1, args.crop, generator),
             augment_view(images, config.augment.view2, args.crop, generator))
    synchronize(device)
    real_s = (time.perf_counter() - start) / args.steps

    plain_views = views_per_step / plain_s
    real_views = views_per_step / real_s
    consumption = args.batch / plain_s  # images/s the model can take
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\npretraining throughput on {name}: {args.arch}, batch {args.batch} x 2 views, "
          f"{args.crop} px, precision {args.precision}, compile {args.compile}, "
          f"{args.workers} workers, torch threads {torch.get_num_threads()}")
    print(f"{'measurement':<34}{'views/s':>10}{'step ms':>10}{'ratio':>10}")
    print(f"{'plain step, random tensors':<34}{plain_views:>10.1f}{plain_s * 1e3:>10.1f}"
          f"{1.0:>10.2f}")
    print(f"{'real data path':<34}{real_views:>10.1f}{real_s * 1e3:>10.1f}"
          f"{real_views / plain_views:>10.2f}")
    print(f"{'loader alone (images/s)':<34}{loader_images_per_s:>10.1f}{'':>10}"
          f"{loader_images_per_s / consumption:>10.2f}  (vs images/s the step consumes)")
    print(f"data wait: {100 * wait / (real_s * args.steps):.1f}% of real-path step time")
    print(json.dumps({
        "device": name, "arch": args.arch, "batch": args.batch, "crop": args.crop,
        "precision": args.precision, "compile": args.compile, "workers": args.workers,
        "plain_views_per_s": round(plain_views, 1), "real_views_per_s": round(real_views, 1),
        "real_over_plain": round(real_views / plain_views, 3),
        "loader_images_per_s": round(loader_images_per_s, 1),
        "loader_over_consumption": round(loader_images_per_s / consumption, 3),
        "data_wait_fraction": round(wait / (real_s * args.steps), 4),
    }))


if __name__ == "__main__":
    main()
