"""Pretraining throughput: the real data path against a plain step on random tensors.

Measurements in one process, same model, batch, precision and device:

1. plain    -- the BYOL step (timm encoder, heads, loss, AdamW, EMA) on random tensors
               already on the device: what the model alone can consume;
2. medssl   -- the engine's step on the same tensors, both views in one pass as the
               plain step does (``view_batchnorm=joint``), then one pass per view
               (``separate``, the reference implementations' way and medssl's BYOL
               default): what per-view BatchNorm statistics cost;
3. loader   -- the shard loader alone (read + decode in workers), images/s;
4. real     -- shards -> loader -> batched augmentation of two views -> the joint step.

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
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# Run as a script, this folder is on sys.path: the baseline lives beside this file.
from plain_byol import make_plain_step
from timing import synchronize, timed_runs
from torch.utils.flop_counter import FlopCounterMode

from data_prep.phantom import PhantomConfig, write_acdc_tree
from data_prep.prepare import PrepareConfig, prepare_dataset
from pretrain.augment import augment_view
from pretrain.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    PretrainConfig,
    ProbeConfig,
    RunConfig,
)
from pretrain.data import Stretch, build_loader, pretrain_epoch_samples
from pretrain.model import build_model
from pretrain.probe import SegmentationProbe
from pretrain.step import autocast_for, ssl_step
from pretrain.weights import takes_img_size


def make_dataset(work: Path, image_size: int, patients: int) -> Path:
    raw, prepared = work / "phantom_acdc", work / f"prepared_{image_size}"
    if not (prepared / "manifest.json").is_file():
        write_acdc_tree(raw, patients, config=PhantomConfig.for_image_size(image_size))
        # one process: a pool's spawned workers would re-import this heavy script
        prepare_dataset(PrepareConfig(source=str(raw), out=str(prepared), name="phantom",
                                      image_size=image_size, min_shards=32, workers=1,
                                      pretrain_splits=["train", "val", "test"]),
                        progress=False)
    return prepared


def endless_batches(data: Path, batch: int, workers: int,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """The engine's loader, epoch after epoch (a new loader per epoch, as in training)."""
    steps = pretrain_epoch_samples(str(data), 0) // batch
    for epoch in itertools.count():
        yield from build_loader(
            str(data), seed=0, epoch=epoch, rank=0, pin_memory=device.type == "cuda",
            stretch=Stretch(world_size=1, micro_batch=batch, workers=workers, block=256,
                            batches=steps))


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
    parser.add_argument("--probe-steps", type=int, default=ProbeConfig.steps,
                        help="head training steps per probe (default: the probe's default)")
    parser.add_argument("--probe-epoch-images", type=int, default=22000,
                        help="images per epoch the probe's share is taken against (ACDC's "
                             "training cine slices: 80 patients x ~30 frames x ~9 slices); "
                             "0: no probe")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of --steps steps (median and spread reported)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--projector-hidden", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU, for MFU (H100/H200 SXM: 989)")
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
    channels_last = device.type == "cuda"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    noise = torch.randn(2, args.batch, 1, args.crop, args.crop, device=device)

    # 1. baseline: the textbook timm + PyTorch BYOL step on random tensors on the device
    plain = make_plain_step(args.arch, 1, args.projector_hidden, device, bf16=bf16,
                            channels_last=channels_last, compile=args.compile,
                            img_size=args.crop if takes_img_size(args.arch) else None)
    plain_runs = time_steps(lambda: plain(noise[0], noise[1]), args.warmup, args.steps,
                            args.repeats, device)
    plain_s = statistics.median(plain_runs)
    plain = None  # free the baseline's memory before building ours
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. medssl's step (the engine's model and step function) on the same random tensors
    byol = build_model(config).to(device)
    if channels_last:
        byol = byol.to(memory_format=torch.channels_last)
    trained = torch.compile(byol) if args.compile else byol
    optimizer = torch.optim.AdamW([p for p in byol.parameters() if p.requires_grad], lr=1e-4)

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        ssl_step(trained, byol, optimizer, view1, view2, lr=1e-4, momentum=0.996,
                  precision=args.precision, channels_last=channels_last)

    byol.view_batchnorm = "joint"  # like for like with the plain step
    ours_runs = time_steps(lambda: step(noise[0], noise[1]), args.warmup, args.steps,
                           args.repeats, device)
    ours_s = statistics.median(ours_runs)
    byol.view_batchnorm = "separate"
    separate_runs = time_steps(lambda: step(noise[0], noise[1]), args.warmup, args.steps,
                               args.repeats, device)
    separate_s = statistics.median(separate_runs)
    byol.view_batchnorm = "joint"
    flops = step_flops(byol, noise, args.precision, channels_last)

    # 3. loader alone
    batches = endless_batches(data, args.batch, args.workers, device)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    loader_steps = max(args.steps, 20)
    for _ in range(loader_steps):
        next(batches)
    loader_images_per_s = loader_steps * args.batch / (time.perf_counter() - start)

    # 4. the real path: loader -> device -> batched augmentation -> medssl's step
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

    # 5. the live segmentation probe at its default settings, once, on this encoder; its
    # share of wall time when it runs after every epoch of --probe-epoch-images images
    probe_s = None
    if args.probe_epoch_images:
        probe = SegmentationProbe(ProbeConfig(every_epochs=1, steps=args.probe_steps),
                                  str(data), args.crop, device)
        probe.run(byol.online_encoder)  # warm-up (kernels, allocator)
        probe_s = probe.run(byol.online_encoder)["seconds"]

    views = 2 * args.batch
    plain_views, ours_views, real_views = views / plain_s, views / ours_s, views / real_s
    separate_views = views / separate_s
    probe_share = None
    if probe_s is not None:
        epoch_s = args.probe_epoch_images / (real_views / 2)
        probe_share = probe_s / (probe_s + epoch_s)
    consumption = args.batch / plain_s  # images/s the baseline step can take
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    achieved = flops / real_s / 1e12
    print(f"\npretraining throughput on {name}: {args.arch}, batch {args.batch} x 2 views, "
          f"{args.crop} px, precision {args.precision}, compile {args.compile}, "
          f"{args.workers} workers, torch threads {torch.get_num_threads()}")
    print(f"{'measurement':<40}{'views/s':>10}{'step ms':>10}{'ratio':>10}")
    for label, value, seconds in (
            ("plain timm+PyTorch step, random tensors", plain_views, plain_s),
            ("medssl step, random tensors", ours_views, ours_s),
            ("medssl step, one pass per view", separate_views, separate_s),
            ("medssl real data path", real_views, real_s)):
        print(f"{label:<40}{value:>10.1f}{seconds * 1e3:>10.1f}{value / plain_views:>10.2f}")
    print(f"{'loader alone (images/s)':<40}{loader_images_per_s:>10.1f}{'':>10}"
          f"{loader_images_per_s / consumption:>10.2f}  (vs images/s the baseline consumes)")
    print(f"data wait: {100 * wait / (real_s * args.steps):.1f}% of real-path step time")
    if probe_share is not None:
        print(f"segmentation probe: {probe_s:.2f} s each, {100 * probe_share:.1f}% of wall "
              f"time after every epoch of {args.probe_epoch_images} images (target < 5%)")
    mfu = f", MFU {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g}" \
        if device.type == "cuda" else ""
    print(f"model FLOPs per step {flops / 1e12:.2f} TFLOP; real path {achieved:.1f} TFLOP/s{mfu}")
    print(json.dumps({
        "device": name, "arch": args.arch, "batch": args.batch, "crop": args.crop,
        "precision": args.precision, "compile": args.compile, "workers": args.workers,
        "plain_views_per_s": round(plain_views, 1), "ours_views_per_s": round(ours_views, 1),
        "plain_views_per_s_range": [round(views / max(plain_runs), 1),
                                    round(views / min(plain_runs), 1)],
        "ours_views_per_s_range": [round(views / max(ours_runs), 1),
                                   round(views / min(ours_runs), 1)],
        "separate_views_per_s": round(separate_views, 1),
        "separate_over_joint": round(separate_views / ours_views, 3),
        "real_views_per_s": round(real_views, 1),
        "real_over_plain": round(real_views / plain_views, 3),
        "loader_images_per_s": round(loader_images_per_s, 1),
        "loader_over_consumption": round(loader_images_per_s / consumption, 3),
        "data_wait_fraction": round(wait / (real_s * args.steps), 4),
        "probe_s": None if probe_s is None else round(probe_s, 3),
        "probe_share": None if probe_share is None else round(probe_share, 4),
        "tflops_per_step": round(flops / 1e12, 3), "real_tflops_per_s": round(achieved, 1),
    }))


def time_steps(step, warmup: int, steps: int, repeats: int,
               device: torch.device) -> list[float]:
    """Seconds per step of each of ``repeats`` runs of ``steps`` steps."""
    return [seconds / steps for seconds in timed_runs(step, steps, warmup, repeats, device)]


def step_flops(byol, noise: torch.Tensor, precision: str, channels_last: bool) -> float:
    """Model FLOPs of one forward + backward (eager, counted by PyTorch's FLOP counter)."""
    views = [v.contiguous(memory_format=torch.channels_last) if channels_last else v
             for v in noise]
    with FlopCounterMode(display=False) as counter:
        with autocast_for(noise.device, precision):
            loss = byol(views[0], views[1])
        loss.backward()
    byol.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    main()
