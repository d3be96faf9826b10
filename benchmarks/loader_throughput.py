"""Loader-only throughput: medssl's two data paths against a plain PIL + torchvision loader.

Every row turns the same slices into pairs of augmented views, batch by batch, and counts
views/s (one view = one augmented crop, so views/s = 2 x batch x batches / seconds):

1. baseline   -- an image folder of the same slices as 8-bit PNGs, read with PIL in a
                 PyTorch ``DataLoader``; each sample gets two independently drawn
                 torchvision (v1, ``torchvision.transforms``) pipelines mirroring the
                 project's default views, the way common SSL libraries load data;
2. webdataset -- ``pretrain.data.build_loader`` (workers read and decode the WebDataset
                 shards through their index files) and the engine's batched
                 ``pretrain.augment.augment_view`` of both views, run in the main process
                 on the training device (CUDA if present, else CPU);
3. dali       -- ``pretrain.dali_loader.build_dali_loader`` reading the same shards and
                 augmenting both views itself (GPU pipeline on CUDA, CPU otherwise).

Each path runs with 1 and 2 workers (DALI: threads) by default. Per-core figures count the
main process as a core: cores = workers + 1 for the PyTorch loaders, threads + 1 for DALI.
The main process is held to ``--main-threads`` torch threads (default 1) so that count is
honest on CPU. On CUDA it also times the plain BYOL-style ResNet-50 step of
``benchmarks/plain_byol.py`` on random tensors and prints each medssl path's views/s over
the views/s that step consumes (the design's target: >= 1.3x). Without ``--data`` it makes
a phantom dataset first (reused from ``--work`` when there). Example (CPU, about 3 minutes
on 2 cores)::

    python benchmarks/loader_throughput.py --work /tmp/medssl-loader

GPU (ResNet-50 consumption at 224 px, batch 256, compiled)::

    python benchmarks/loader_throughput.py --work /tmp/medssl-gpu --batch 256 --crop 224 \
        --workers 4 8 --timed 20 --warmup 5 --compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Run as a script, this folder is on sys.path: the phantom dataset and the plain step that
# the other benchmarks use live beside this file.
from plain_byol import make_plain_step
from pretrain_throughput import make_dataset, time_steps
from timing import synchronize
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

from data_prep.shard_reader import iterate_shards, shard_paths
from pretrain.augment import augment_view
from pretrain.config import AugmentConfig, ViewConfig
from pretrain.dali_loader import DaliNotInstalledError, build_dali_loader
from pretrain.data import Stretch, build_loader, pretrain_epoch_samples

ViewPair = tuple[torch.Tensor, torch.Tensor]
CONSUMPTION_TARGET = 1.3  # the design's loader / model-consumption target


@dataclass
class Row:
    """One measured loader: views/s, or ``None`` with the reason it did not run."""

    path: str
    workers: int
    views_per_s: float | None  # median over the timed repeats
    note: str = ""
    spread: tuple[float, float] | None = None  # slowest and fastest repeat

    @property
    def cores(self) -> int:
        return self.workers + 1  # workers (or DALI threads) plus the main process


# --- the image folder the baseline reads ------------------------------------------------

def write_png_folder(data: Path, out: Path) -> Path:
    """One 8-bit grayscale PNG per pretraining slice of ``data``, written once into ``out``.

    8 bits because that is what PIL/torchvision SSL pipelines read: they open PNG/JPEG files
    as 8-bit images. Each slice's normalised float image is rescaled by its own min/max, as
    a user exporting slices for such a pipeline would. The folder is filled under a
    temporary name and renamed at the end, so an existing ``out`` is complete.
    """
    if out.is_dir():
        return out
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    for index, sample in enumerate(iterate_shards(shard_paths(data))):
        Image.fromarray(to_uint8(single_channel(sample.image, sample.key))).save(
            partial / f"{index:06d}.png")
    partial.rename(out)
    return out


def single_channel(image: np.ndarray, key: str) -> np.ndarray:
    if image.ndim == 3 and image.shape[0] == 1:
        return image[0]
    if image.ndim != 2:
        raise ValueError(f"slice {key}: the baseline reads 1-channel images, got {image.shape}")
    return image


def to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    unit = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.round(unit * 255).astype(np.uint8)


def pixel_mean_std(files: list[Path]) -> tuple[float, float]:
    """Mean and std of the folder's pixels in [0, 1], for the baseline's ``Normalize``."""
    pixels = np.concatenate([np.asarray(Image.open(f), dtype=np.float64).ravel() / 255
                             for f in files])
    return float(pixels.mean()), float(pixels.std())


# --- 1. the baseline: PIL + torchvision in a DataLoader ---------------------------------

def torchvision_view(view: ViewConfig, crop: int, mean: float, std: float) -> Callable:
    """torchvision v1 transforms for one of medssl's views.

    Gamma and Gaussian noise have no torchvision v1 transform and are left out, so the
    baseline does slightly less work than medssl's views: the ratios err in its favour.
    ColorJitter's brightness is a factor where medssl's is a shift; the cost is the same.
    """
    steps: list[Callable] = [transforms.RandomResizedCrop(crop, scale=view.scale,
                                                          ratio=view.ratio)]
    if view.hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(view.hflip))
    if view.vflip > 0:
        steps.append(transforms.RandomVerticalFlip(view.vflip))
    if view.rotation > 0:
        steps.append(transforms.RandomRotation(view.rotation))
    if view.brightness > 0 or view.contrast > 0:
        steps.append(transforms.ColorJitter(brightness=view.brightness, contrast=view.contrast))
    if view.blur_prob > 0:
        # The same kernel reach as medssl's blur: radius ceil(3 sigma_max).
        kernel = 2 * math.ceil(3 * view.blur_sigma[1]) + 1
        steps.append(transforms.RandomApply(
            [transforms.GaussianBlur(kernel, sigma=view.blur_sigma)], p=view.blur_prob))
    steps += [transforms.ToTensor(), transforms.Normalize([mean], [std])]
    return transforms.Compose(steps)


class TwoViewFolder(Dataset):
    """PNG files opened with PIL, each returned as two independently augmented views."""

    def __init__(self, files: list[Path], view1: Callable, view2: Callable) -> None:
        self.files, self.view1, self.view2 = files, view1, view2

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ViewPair:
        image = Image.open(self.files[index]).convert("L")
        return self.view1(image), self.view2(image)


def baseline_pairs(files: list[Path], mean: float, std: float, augment: AugmentConfig,
                   args: argparse.Namespace, workers: int, batches: int,
                   device: torch.device) -> Iterator[ViewPair]:
    dataset = TwoViewFolder(files, torchvision_view(augment.view1, args.crop, mean, std),
                            torchvision_view(augment.view2, args.crop, mean, std))
    # Reshuffled passes over the folder in one sampler: no epoch boundary drains the
    # workers' prefetch queue mid-measurement.
    sampler = RandomSampler(dataset, num_samples=batches * args.batch,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    for view1, view2 in loader:
        yield view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)


# --- 2. medssl's WebDataset loader + batched augmentation on the device -----------------

def webdataset_pairs(data: Path, augment: AugmentConfig, args: argparse.Namespace,
                     workers: int, batches: int, device: torch.device) -> Iterator[ViewPair]:
    """As the engine's ``_ViewSource``: batches to the device, then both views augmented."""
    # One epoch as long as the measurement: a small dataset is then drawn shard by shard
    # with replacement (data.resampled), so no epoch boundary restarts the workers.
    samples = batches * args.batch
    loader = build_loader(str(data), seed=0, epoch=0, rank=0,
                          stretch=Stretch(world_size=1, micro_batch=args.batch, workers=workers,
                                          block=args.shuffle_buffer, batches=batches),
                          epoch_samples=samples,
                          resampled=samples > pretrain_epoch_samples(str(data), 0),
                          pin_memory=device.type == "cuda")
    for step, images in enumerate(loader):
        images = images.to(device, non_blocking=True)
        generator = torch.Generator(device=device).manual_seed(step)
        yield (augment_view(images, augment.view1, args.crop, generator),
               augment_view(images, augment.view2, args.crop, generator))


# --- 3. medssl's DALI loader, augmenting in its own pipeline ----------------------------

def dali_pairs(data: Path, augment: AugmentConfig, args: argparse.Namespace,
               threads: int, device: torch.device) -> Iterator[ViewPair]:
    return build_dali_loader(str(data), per_rank_batch=args.batch, rank=0, world_size=1,
                             seed=0, device=device, shuffle_buffer=args.shuffle_buffer,
                             threads=threads, views=(augment.view1, augment.view2),
                             crop_size=args.crop)


# --- timing ------------------------------------------------------------------------------

def views_per_second(pairs: Iterator[ViewPair], warmup: int, timed: int, batch: int,
                     device: torch.device, repeats: int = 3) -> tuple[float, float, float]:
    """Views/s (median, slowest, fastest) over ``repeats`` runs that share ``timed``
    batches, after ``warmup`` untimed ones (worker start-up, first reads, lazy CUDA
    init)."""
    for _ in range(warmup):
        next(pairs)
    synchronize(device)
    chunk = max(1, timed // repeats)
    rates = []
    for _ in range(max(1, min(repeats, timed))):
        start = time.perf_counter()
        for _ in range(chunk):
            next(pairs)
        synchronize(device)  # GPU augmentation is asynchronous: count it to its end
        rates.append(2 * batch * chunk / (time.perf_counter() - start))
    return statistics.median(rates), min(rates), max(rates)


def measure(path: str, workers: int, make_pairs: Callable[[], Iterator[ViewPair]],
            args: argparse.Namespace, device: torch.device) -> Row:
    print(f"measuring {path} with {workers} worker(s) ...", flush=True)
    try:
        pairs = make_pairs()
    except DaliNotInstalledError:
        return Row(path, workers, None, "not installed")
    try:
        speed, slowest, fastest = views_per_second(pairs, args.warmup, args.timed,
                                                   args.batch, device)
    finally:
        close = getattr(pairs, "close", None)  # generators: shut the DataLoader down now
        if close is not None:
            close()
    return Row(path, workers, speed, spread=(slowest, fastest))


def consumption_views_per_s(arch: str, args: argparse.Namespace,
                            device: torch.device) -> float:
    """Views/s the plain BYOL-style step (bf16, channels_last) takes from random tensors."""
    step = make_plain_step(arch, 1, args.projector_hidden, device, bf16=True,
                           channels_last=True, compile=args.compile)
    noise = torch.randn(2, args.batch, 1, args.crop, args.crop, device=device)
    seconds = time_steps(lambda: step(noise[0], noise[1]), max(args.warmup, 3), args.timed,
                         3, device)
    return 2 * args.batch / statistics.median(seconds)


# --- report ------------------------------------------------------------------------------

def print_table(rows: list[Row], consumption: float | None) -> None:
    baseline = {r.workers: r.views_per_s for r in rows if r.path == "baseline"}
    header = ("| path | workers/threads | cores | views/s (median, slowest-fastest) | "
              "views/s per core | vs baseline |")
    rule = "|---|---:|---:|---:|---:|---:|"
    if consumption is not None:
        header += " vs consumption |"
        rule += "---:|"
    print(header)
    print(rule)
    for row in rows:
        if row.views_per_s is None:
            cells = f"| {row.path} | {row.workers} | {row.cores} | {row.note} | | |"
            print(cells + (" |" if consumption is not None else ""))
            continue
        reference = baseline.get(row.workers)
        ratio = f"{row.views_per_s / reference:.2f}" if reference else ""
        spread = f" ({row.spread[0]:.1f}-{row.spread[1]:.1f})" if row.spread else ""
        cells = (f"| {row.path} | {row.workers} | {row.cores} | {row.views_per_s:.1f}{spread} | "
                 f"{row.views_per_s / row.cores:.1f} | {ratio} |")
        if consumption is not None:
            cells += f" {row.views_per_s / consumption:.2f} |"
        print(cells)


def print_consumption_verdicts(rows: list[Row], consumption: float, arch: str) -> None:
    print(f"\n{arch} BYOL-style step (benchmarks/plain_byol.py, bf16, channels_last) consumes "
          f"{consumption:.1f} views/s; target: loader >= {CONSUMPTION_TARGET}x that")
    for row in rows:
        if row.path == "baseline" or row.views_per_s is None:
            continue
        ratio = row.views_per_s / consumption
        verdict = "meets" if ratio >= CONSUMPTION_TARGET else "below"
        print(f"  {row.path}, {row.workers} worker(s): {ratio:.2f}x -> {verdict} the target")


# --- main --------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset (default: make a phantom one)")
    parser.add_argument("--work", default=None,
                        help="folder for the phantom dataset and the PNG folder (reused)")
    parser.add_argument("--patients", type=int, default=4, help="phantom patients")
    parser.add_argument("--image-size", type=int, default=256, help="phantom slice size, px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=192, help="augmented view size, px")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts (DALI: thread counts) to measure each path with")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per row")
    parser.add_argument("--timed", type=int, default=64, help="timed batches per row")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--main-threads", type=int, default=1,
                        help="torch threads of the main process (counted as one core)")
    parser.add_argument("--only", nargs="+", choices=["webdataset", "dali"],
                        default=["webdataset", "dali"],
                        help="medssl paths to measure (the baseline always runs)")
    parser.add_argument("--consumption-arch", default=None,
                        help="model whose step consumption to compare with (default on "
                             "CUDA: resnet50; 'none' to skip)")
    parser.add_argument("--projector-hidden", type=int, default=4096)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the consumption step (as the design's figure)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.main_threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else make_dataset(work, args.image_size, args.patients)
    folder = write_png_folder(data, work / f"png_{data.name}")
    files = sorted(folder.glob("*.png"))
    mean, std = pixel_mean_std(files)
    augment = AugmentConfig()
    batches = args.warmup + args.timed

    runs: list[tuple[str, int, Callable[[], Iterator[ViewPair]]]] = []
    for workers in args.workers:
        runs.append(("baseline", workers, lambda w=workers: baseline_pairs(
            files, mean, std, augment, args, w, batches, device)))
        if "webdataset" in args.only:
            runs.append(("webdataset", workers, lambda w=workers: webdataset_pairs(
                data, augment, args, w, batches, device)))
        if "dali" in args.only:
            runs.append(("dali", workers, lambda w=workers: dali_pairs(
                data, augment, args, w, device)))
    start = time.perf_counter()
    rows = [measure(path, workers, make, args, device) for path, workers, make in runs]

    arch = args.consumption_arch or ("resnet50" if device.type == "cuda" else "none")
    consumption = None
    if device.type == "cuda" and arch != "none":
        print(f"measuring the {arch} step's consumption ...", flush=True)
        consumption = consumption_views_per_s(arch, args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nloader throughput on {name} ({os.cpu_count()} CPU cores): {len(files)} slices of "
          f"{data}, batch {args.batch}, {args.crop} px views, {args.warmup} warm-up + "
          f"{args.timed} timed batches per row; baseline: PIL + torchvision v1 transforms "
          f"in a DataLoader; cores = workers (DALI: threads) + 1 main process "
          f"(torch threads {args.main_threads}); measured in {time.perf_counter() - start:.0f} s\n")
    print_table(rows, consumption)
    if consumption is not None:
        print_consumption_verdicts(rows, consumption, arch)
    else:
        print(f"\nconsumption check (loader >= {CONSUMPTION_TARGET}x what the ResNet-50 step "
              "consumes) needs a GPU" if device.type != "cuda" else "\nconsumption: skipped")
    print(json.dumps({
        "device": name, "batch": args.batch, "crop": args.crop, "slices": len(files),
        "rows": [{"path": r.path, "workers": r.workers, "cores": r.cores,
                  "views_per_s": None if r.views_per_s is None else round(r.views_per_s, 1),
                  "views_per_s_range": None if r.spread is None else
                  [round(v, 1) for v in r.spread],
                  "note": r.note} for r in rows],
        "consumption_views_per_s": None if consumption is None else round(consumption, 1),
    }))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
