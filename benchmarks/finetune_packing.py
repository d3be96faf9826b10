"""Packing fine-tuning trials on one GPU: 1, 2, 4 and 8 trials at once, as a sweep does.

A sweep with ``resources.gpu = 1/K`` lets Ray Tune run K trials on each GPU at once, each
in its own worker process, each capped to 1/K of the GPU's memory
(``finetune.sweep_trial.cap_cuda_memory``), each running trial after trial in the same
process (``reuse_actors``). Small label budgets make small, short runs that leave a GPU
mostly idle alone; packing should fill it (the design's target: >= 85% busy). This script
measures that without Ray (whose wheel is too large for the lent GPU machine): for each K
it starts K spawned processes at once, each capping its memory to 1/K and then running
``--rounds`` trials of ``finetune.train.train_run`` one after another, and reports:

- trials finished per hour (all K x rounds trials over the wall time from launching the
  processes to the last one finishing: process start-up and imports included, as a
  Ray worker pays them once too), and the gain over one trial at a time;
- the GPU's busy fraction over that window: ``nvidia-smi``'s ``utilization.gpu`` (the
  share of time a kernel was running) sampled every 0.5 s, and its memory in use;
- images/s per trial and in total.

The same runs on CPU as a dry run (``--device cpu``; busy = all cores' busy share from
``/proc/stat``). GPU (``benchmarks/gpu_checks.sh`` section 7)::

    python benchmarks/finetune_packing.py --work /tmp/medssl-gpu --data /tmp/medssl-gpu/prepared_256

CPU dry run (tiny sizes, about a minute on 2 cores)::

    python benchmarks/finetune_packing.py --work /tmp/medssl-packing --device cpu \\
        --concurrency 1 2 --rounds 1 --arch resnet18 --image-size 64 --epochs 1 \\
        --batch 4 --epoch-samples 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run as a script, this folder is on sys.path: the phantom the sweep benchmark makes.
from sweep_overhead import make_phantom

from cluster.config import from_dict, to_dict
from finetune.config import FinetuneConfig

SAMPLE_MS = 500  # GPU utilisation sampling period


@dataclass
class Launch:
    """What one K measured: trials, their times and what the device did meanwhile."""

    concurrent: int
    memory_cap: float
    wall_s: float = 0.0
    startup_s: float = 0.0  # launch -> the last worker ready (imports, CUDA context)
    trials: list[dict[str, Any]] = field(default_factory=list)  # one per finished trial
    errors: list[str] = field(default_factory=list)
    busy: float | None = None  # device busy fraction over the wall time
    memory_used_gb: float | None = None  # peak GPU memory in use (all processes)
    peak_reserved_gb: float | None = None  # the largest one worker reserved

    @property
    def trials_per_hour(self) -> float:
        return len(self.trials) / self.wall_s * 3600 if self.wall_s else 0.0

    @property
    def images_per_s(self) -> float:
        return sum(t["images"] for t in self.trials) / self.wall_s if self.wall_s else 0.0


# --- one worker process (a Ray trial worker's stand-in) ----------------------------------

def cap_memory(fraction: float) -> float:
    """The sweep trial's memory cap, without needing Ray on the GPU machine."""
    try:
        from finetune.sweep_trial import cap_cuda_memory  # imports ray
    except ImportError:
        # ray is missing: the same single call as finetune.sweep_trial.cap_cuda_memory
        cap = min(1.0, fraction)
        if cap < 1.0:
            torch.cuda.set_per_process_memory_fraction(cap, 0)
        return cap
    return cap_cuda_memory(fraction)


def worker(slot: int, concurrent: int, threads: int, configs: list[dict[str, Any]],
           device: str, out: Any) -> None:
    """Run ``configs`` one after another, as a reused Ray trial actor would; report each
    finished trial (or the error) on ``out``."""
    from data_prep.pool import exit_with_parent
    from finetune.train import train_run  # after spawn: the parent's import is not shared

    exit_with_parent(os.getppid())  # a killed benchmark leaves no trial process behind
    torch.set_num_threads(threads)  # the trial's CPU share, as run_trial sets it
    if device == "cuda":
        cap_memory(1 / concurrent)
        torch.zeros(1, device="cuda")  # the CUDA context now, counted as start-up
    out.put({"slot": slot, "ready": time.time()})
    try:
        for raw in configs:
            config = from_dict(FinetuneConfig, raw)
            start = time.perf_counter()
            metrics = train_run(config)
            out.put({"slot": slot, "trial": trial_record(config, metrics,
                                                         time.perf_counter() - start)})
    except Exception as exc:  # reported, not raised: the parent prints it in the table
        out.put({"slot": slot, "error": f"{type(exc).__name__}: {exc}"})
    peak = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None
    out.put({"slot": slot, "done": time.time(), "peak_reserved_gb": peak})


def trial_record(config: FinetuneConfig, metrics: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    """What the table needs of one finished trial."""
    epochs = metrics["epochs"]
    samples = max(config.epoch_samples, metrics["train_slices"])
    images = len(epochs) * max(1, samples // config.batch_size) * config.batch_size
    return {"seed": config.seed, "wall_s": seconds, "training_s": epochs[-1]["seconds"],
            "images": images, "test_dice": (metrics["test"] or {}).get("dice"),
            "images_per_s": sum(e["train_images_per_s"] for e in epochs) / len(epochs)}


# --- what the device did -----------------------------------------------------------------

class GpuSampler:
    """``nvidia-smi`` polled every 0.5 s in its own loop (``-lms``), read by a thread."""

    def __init__(self, index: int = 0) -> None:
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self.process = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu,memory.used",
             "--format=csv,noheader,nounits", f"-lms={SAMPLE_MS}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout or []:
            try:
                utilisation, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue  # "[N/A]" or a partial line
            self.samples.append((utilisation, memory))

    def stop(self) -> tuple[float | None, float | None]:
        """Mean busy fraction and peak memory used (GiB) over the samples."""
        self.process.terminate()
        self.process.wait(timeout=10)
        self.thread.join(timeout=10)
        if not self.samples:
            return None, None
        busy = sum(u for u, _ in self.samples) / len(self.samples) / 100
        return busy, max(m for _, m in self.samples) / 1024


class CpuSampler:
    """All cores' busy share between start and stop, from ``/proc/stat`` (dry runs)."""

    def __init__(self) -> None:
        self.start = self._times()

    @staticmethod
    def _times() -> tuple[float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except OSError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    def stop(self) -> tuple[float | None, float | None]:
        end = self._times()
        if self.start is None or end is None or end[0] == self.start[0]:
            return None, None
        return 1 - (end[1] - self.start[1]) / (end[0] - self.start[0]), None


# --- one K -------------------------------------------------------------------------------

def trial_configs(args: argparse.Namespace, data: Path, folder: Path, slot: int,
                  ) -> list[dict[str, Any]]:
    """The worker's trials: one seed each (its own run folder), the rest identical."""
    configs = []
    for round_ in range(args.rounds):
        seed = slot * args.rounds + round_
        config = FinetuneConfig(
            data=str(data), out=str(folder / f"seed{seed}"), arch=args.arch, seed=seed,
            budget=args.budget, epochs=args.epochs, batch_size=args.batch,
            epoch_samples=args.epoch_samples, lr=1e-3, warmup_epochs=min(0.5, args.epochs),
            overlays=0, progress=False, device="cpu" if args.device == "cpu" else "auto",
            checkpoint_every=args.checkpoint_every)
        configs.append(to_dict(config))
    return configs


def run_launch(args: argparse.Namespace, data: Path, concurrent: int) -> Launch:
    """K processes at once, each ``--rounds`` trials; the device sampled meanwhile."""
    folder = Path(args.work) / "packing" / f"k{concurrent}"
    shutil.rmtree(folder, ignore_errors=True)  # finished runs would not train again
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // concurrent)
    launch = Launch(concurrent, min(1.0, 1 / concurrent) if args.device == "cuda" else 1.0)
    context = mp.get_context("spawn")  # CUDA cannot be used in forked children
    out = context.Queue()
    print(f"== {concurrent} at once: {concurrent * args.rounds} trials, {threads} torch "
          f"thread(s) per process", flush=True)
    sampler = GpuSampler() if args.device == "cuda" else CpuSampler()
    started_at, start = time.time(), time.perf_counter()
    processes = [context.Process(target=worker, args=(slot, concurrent, threads,
                                                      trial_configs(args, data, folder, slot),
                                                      args.device, out))
                 for slot in range(concurrent)]
    for process in processes:
        process.start()
    ready, peaks = collect(launch, processes, out, args.timeout)
    launch.wall_s = time.perf_counter() - start
    launch.busy, launch.memory_used_gb = sampler.stop()
    launch.startup_s = max(ready, default=started_at) - started_at
    launch.peak_reserved_gb = max(peaks, default=None)
    return launch


def collect(launch: Launch, processes: list[Any], out: Any,
            timeout: float) -> tuple[list[float], list[float]]:
    """Read the workers' messages until every one has exited (or ``timeout`` passed)."""
    ready: list[float] = []
    peaks: list[float] = []
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in processes) or not out.empty():
        if time.monotonic() > deadline:
            for process in processes:
                process.terminate()
            launch.errors.append(f"timed out after {timeout:.0f} s")
            break
        try:
            message = out.get(timeout=1)
        except queue.Empty:
            continue
        if "ready" in message:
            ready.append(message["ready"])
        if "trial" in message:
            launch.trials.append(message["trial"])
        if "error" in message:
            launch.errors.append(f"worker {message['slot']}: {message['error']}")
        if message.get("peak_reserved_gb") is not None:
            peaks.append(message["peak_reserved_gb"])
    for process in processes:
        process.join(timeout=30)
        if process.exitcode not in (0, None) and not launch.errors:
            launch.errors.append(f"a worker exited with status {process.exitcode}")
    return ready, peaks


# --- report ------------------------------------------------------------------------------

def print_table(launches: list[Launch], device: str) -> None:
    one = next((x.trials_per_hour for x in launches if x.concurrent == 1 and x.trials), None)
    busy_name = "GPU busy" if device == "cuda" else "CPU busy"
    print(f"| at once | memory cap | trials | wall s | start-up s | trials/h | vs 1 at once | "
          f"{busy_name} | GPU memory used GiB | per worker reserved GiB | trial wall s | "
          "images/s per trial | images/s total |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in launches:
        gain = f"{x.trials_per_hour / one:.2f}" if one else ""
        busy = f"{x.busy:.0%}" if x.busy is not None else "n/a"
        used = f"{x.memory_used_gb:.1f}" if x.memory_used_gb is not None else "n/a"
        reserved = f"{x.peak_reserved_gb:.1f}" if x.peak_reserved_gb is not None else "n/a"
        n = len(x.trials) or 1
        print(f"| {x.concurrent} | {x.memory_cap:.3g} | {len(x.trials)} | {x.wall_s:.1f} | "
              f"{x.startup_s:.1f} | {x.trials_per_hour:.0f} | {gain} | {busy} | {used} | "
              f"{reserved} | {sum(t['wall_s'] for t in x.trials) / n:.1f} | "
              f"{sum(t['images_per_s'] for t in x.trials) / n:.0f} | {x.images_per_s:.0f} |")
    for x in launches:
        for error in x.errors:
            print(f"{x.concurrent} at once: {error}")


# --- main --------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="folder for the phantom and the runs")
    parser.add_argument("--data", help="prepared dataset (default: make a phantom one)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="trials at once per GPU (K); each capped to 1/K of its memory")
    parser.add_argument("--rounds", type=int, default=2,
                        help="trials each process runs one after another")
    parser.add_argument("--arch", default="resnet50", help="U-Net encoder")
    parser.add_argument("--image-size", type=int, default=256, help="phantom slice size, px")
    parser.add_argument("--patients", type=int, default=12, help="phantom patients")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epoch-samples", type=int, default=512)
    parser.add_argument("--budget", type=int, default=0, help="labeled slices; 0 = all")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="resumable state every N epochs, as sweep trials keep it")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (default: CPU cores / K)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per K at most")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --device cpu for a dry run)")
    keep = args.work is not None
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-packing-"))
    args.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else make_phantom(work, args.image_size, args.patients)
    start = time.perf_counter()
    launches = [run_launch(args, data, k) for k in args.concurrency]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\nfine-tuning trials packed on {name} ({os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}): {args.arch} U-Net, {data.name}, {args.epochs} epochs x "
          f"{args.epoch_samples} samples, batch {args.batch}, budget {args.budget}, "
          f"{args.rounds} trial(s) per process; measured in "
          f"{time.perf_counter() - start:.0f} s\n")
    print_table(launches, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "cpus": os.cpu_count(), "torch": torch.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "launches": [{"concurrent": x.concurrent, "memory_cap": x.memory_cap,
                          "wall_s": x.wall_s, "startup_s": x.startup_s,
                          "trials_per_hour": x.trials_per_hour, "busy": x.busy,
                          "memory_used_gb": x.memory_used_gb,
                          "peak_reserved_gb": x.peak_reserved_gb,
                          "images_per_s": x.images_per_s, "trials": x.trials,
                          "errors": x.errors} for x in launches]}, indent=2))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    if any(x.errors for x in launches):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
