"""Fine-tuning throughput: medssl's real step next to a plain textbook loop, in one run.

medssl's path is the one ``finetune train`` runs: labeled slices read from the prepared
zarr store, kept on the device (``finetune.device_data``), each batch gathered and
augmented jointly on the device and trained by ``finetune.step.FinetuneStep`` (bf16
autocast and channels_last on CUDA). The baseline is the loop a textbook would write: an
smp U-Net on the same timm encoder, Adam, MONAI's DiceCELoss, the same batch, precision,
input size and memory format, on random tensors already on the device, no augmentation.
Both run eager and compiled (``torch.compile``). Also measured: one validation pass
(``finetune.train.predict`` over the validation slices, bf16, inference mode) and one
whole epoch (``--epoch-samples`` images of real steps, then the validation pass).

Timing: ``--warmup`` steps first (compilation included there), then ``--repeats`` runs
of ``--steps`` steps each, timed with CUDA events after synchronising (``perf_counter``
on the CPU); the median and the spread (min to max) over the repeats are reported.

Projection: GPU-hours of the reference grid (``--grid-runs`` runs x ``--grid-epochs``
epochs x ``--grid-slices`` slices, one validation pass of ``--grid-val-slices`` slices
per epoch) from the compiled real path, one run per GPU; with ``--packing FILE`` (the
JSON of ``benchmarks/finetune_packing.py``) also with 1, 2, 4 and 8 runs packed per GPU,
scaled by the measured gain in images/s, and each packing's busy fraction: the step time
the packed trials' images take at this run's unpacked speed, over the wall time.

GPU (``benchmarks/run.py --gpu`` runs it)::

    python benchmarks/finetune_throughput.py --device cuda

CPU dry run (tiny sizes)::

    python benchmarks/finetune_throughput.py --device cpu --arch resnet18 --image-size 64 \\
        --batch 8 --steps 3 --warmup 1 --repeats 2 --modes eager --epoch-samples 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss

# Run as a script, this folder is on sys.path: the phantom the sweep benchmark makes.
from sweep_overhead import make_phantom
from timing import timed_runs

from data_prep.labeled_slices import load_slices
from data_prep.manifest import Manifest
from finetune.config import FinetuneConfig
from finetune.device_data import place_splits
from finetune.model import build_unet
from finetune.step import autocast, build_step
from finetune.train import predict


def rate(seconds: list[float], images: int) -> dict[str, float]:
    """Images/s: the median over repeats, and the slowest and fastest repeat."""
    rates = [images / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def plain_loop(args: argparse.Namespace, classes: int, device: torch.device,
               compiled: bool) -> dict[str, float]:
    """The textbook step on random device-resident tensors."""
    torch.manual_seed(0)
    model = build_unet(args.arch, 1, classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, dynamic=False) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.randn(args.batch, 1, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, classes, (args.batch, 1, args.image_size, args.image_size),
                          device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = forward(images)
        loss_fn(logits.float(), masks).backward()
        optimizer.step()

    model.train()
    return rate(timed_runs(step, args.steps, args.warmup, args.repeats, device),
                args.steps * args.batch)


def real_path(args: argparse.Namespace, data: Path, device: torch.device,
              compiled: bool) -> dict[str, Any]:
    """medssl's step, validation pass and whole epoch on the prepared dataset."""
    torch.manual_seed(0)
    manifest = Manifest.read(data)
    config = FinetuneConfig(data=str(data), arch=args.arch, batch_size=args.batch,
                            optimizer="adam", lr=1e-4, loss="dice_ce", compile=compiled,
                            val_batch_size=args.val_batch, device_data_gb=args.device_gb)
    train, val = load_slices(data, "train"), load_slices(data, "val")
    train_data, val_data = place_splits(train, val, device, config.device_data_gb)
    model = build_unet(args.arch, 1, manifest.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train_step = build_step(model, config, device)
    generator = torch.Generator(device=device).manual_seed(0)
    draws = torch.Generator(device=train_data.index_device()).manual_seed(1)

    def step() -> torch.Tensor:
        index = torch.randint(0, len(train_data), (args.batch,), generator=draws,
                              device=train_data.index_device())
        return train_step(train_data, index, generator, 1e-4)

    model.train()
    steps = rate(timed_runs(step, args.steps, args.warmup, args.repeats, device),
                 args.steps * args.batch)

    def validate() -> None:
        predict(train_step.forward, val_data, device, args.val_batch)
        model.train()

    val_seconds = timed_runs(validate, 1, 1, args.repeats, device)

    def epoch() -> None:
        losses = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(max(1, args.epoch_samples // args.batch)):
            losses += step()
        losses.item()
        validate()

    epoch_seconds = timed_runs(epoch, 1, 0, 1, device)
    return {"step": steps, "val_pass_s": statistics.median(val_seconds),
            "val_slices": len(val_data), "epoch_s": epoch_seconds[0],
            "epoch_images": max(1, args.epoch_samples // args.batch) * args.batch,
            "data_on_device": {"train": train_data.resident, "val": val_data.resident}}


def projection(args: argparse.Namespace, real: dict[str, Any], mode: str,
               packing: dict[str, Any] | None) -> list[dict[str, Any]]:
    """GPU-hours of the reference grid from the measured compiled real path."""
    images_per_s = real["step"]["median"]
    val_per_slice = real["val_pass_s"] / real["val_slices"]
    per_epoch = args.grid_slices / images_per_s + args.grid_val_slices * val_per_slice
    one_gpu_hours = args.grid_runs * args.grid_epochs * per_epoch / 3600
    rows = [{"packed": 1, "gpu_hours": one_gpu_hours, "gain": 1.0, "busy": None,
             "source": f"this run's {mode} medssl step, one run per device"}]
    if packing is None:
        return rows
    launches = {x["concurrent"]: x for x in packing["launches"] if x["trials"]}
    single = launches.get(1)
    if single is None:
        return rows
    rows = []
    for k in sorted(launches):
        launch = launches[k]
        gain = launch["images_per_s"] / single["images_per_s"]
        # the step time the packed trials' images take at the unpacked speed, over wall
        busy = sum(t["images"] for t in launch["trials"]) / images_per_s / launch["wall_s"]
        rows.append({"packed": k, "gpu_hours": one_gpu_hours / gain, "gain": gain,
                     "busy": busy, "source": "packing measured by finetune_packing.py"})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the phantom (default: a temporary one)")
    parser.add_argument("--data", help="prepared dataset (default: a phantom one)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--arch", default="resnet50", help="U-Net encoder (timm name)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patients", type=int, default=12, help="phantom patients")
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--val-batch", type=int, default=192)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        default=["eager", "compiled"])
    parser.add_argument("--epoch-samples", type=int, default=1498,
                        help="images in the measured whole epoch (the reference study's)")
    parser.add_argument("--device-gb", type=float, default=8.0,
                        help="device memory the slices may take (FinetuneConfig)")
    parser.add_argument("--grid-runs", type=int, default=600)
    parser.add_argument("--grid-epochs", type=int, default=150)
    parser.add_argument("--grid-slices", type=int, default=1498)
    parser.add_argument("--grid-val-slices", type=int, default=190,
                        help="ACDC's validation split (20 volumes) in slices")
    parser.add_argument("--packing", help="finetune_packing.py --json output to project with")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --device cpu for a dry run)")
    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-finetune-bench-"))
    data = Path(args.data) if args.data else make_phantom(work, args.image_size, args.patients)
    classes = Manifest.read(data).num_classes
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    results: dict[str, Any] = {"device": name, "cpus": os.cpu_count(),
                               "torch": torch.__version__, "modes": {},
                               "settings": {k: v for k, v in vars(args).items()}}
    for mode in args.modes:
        compiled = mode == "compiled"
        plain = plain_loop(args, classes, device, compiled)
        real = real_path(args, data, device, compiled)
        results["modes"][mode] = {"plain": plain, "real": real,
                                  "ratio": real["step"]["median"] / plain["median"]}
    packing = None
    if args.packing and Path(args.packing).is_file():
        packing = json.loads(Path(args.packing).read_text())
    elif args.packing:
        print(f"note: {args.packing} does not exist (run finetune_packing.py --json first); "
              "projecting one run per device only")
    mode = "compiled" if "compiled" in results["modes"] else args.modes[0]
    results["projection"] = projection(args, results["modes"][mode]["real"], mode, packing)
    print_report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nfine-tuning step on {results['device']} ({results['cpus']} CPU cores, torch "
          f"{results['torch']}): {args.arch} U-Net, {args.image_size} px, batch {args.batch}"
          f"{', bf16, channels_last' if args.device == 'cuda' else ', fp32'}\n")
    print("| mode | plain loop images/s | medssl images/s | ratio | validation pass s "
          "(slices) | whole epoch s (images) | data on device |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode, figures in results["modes"].items():
        plain, real = figures["plain"], figures["real"]
        print(f"| {mode} | {plain['median']:.1f} ({plain['min']:.1f}-{plain['max']:.1f}) | "
              f"{real['step']['median']:.1f} ({real['step']['min']:.1f}-"
              f"{real['step']['max']:.1f}) | {figures['ratio']:.2f} | "
              f"{real['val_pass_s']:.2f} ({real['val_slices']}) | {real['epoch_s']:.1f} "
              f"({real['epoch_images']}) | train {real['data_on_device']['train']}, val "
              f"{real['data_on_device']['val']} |")
    print(f"\nreference grid: {args.grid_runs} runs x {args.grid_epochs} epochs x "
          f"{args.grid_slices} slices (+{args.grid_val_slices} validation slices per epoch), "
          f"{args.arch} at {args.image_size} px\n")
    print("| runs per device | device-hours | gain | busy | from |")
    print("|---:|---:|---:|---:|---|")
    for row in results["projection"]:
        busy = f"{row['busy']:.0%}" if row["busy"] is not None else "n/a"
        print(f"| {row['packed']} | {row['gpu_hours']:.1f} | {row['gain']:.2f} | {busy} | "
              f"{row['source']} |")


if __name__ == "__main__":
    main()
