"""Multi-process scaling of pretraining: the engine under torchrun with 1 and N processes.

The same run (``python -m pretrain``, BYOL, the same global batch and steps) is launched
with 1 process, then with ``--procs`` processes (gloo on the CPU, NCCL on GPUs: one
process per GPU), each rendezvousing on 127.0.0.1 only. Every process gets
``cores / N`` torch threads on the CPU, so the comparison spends the same cores. The
figure is views/s over the logged steps after the first ``--skip`` (warm-up), read from
the run's own TensorBoard ``perf/views_per_s``; the baseline is the 1-process run, and
the ratio N-process / 1-process is the scaling (N is ideal on GPUs; on one CPU machine
the cores are shared, so near 1 means the communication costs little).

CPU (2 cores, about a minute)::

    python benchmarks/pretrain_scaling.py --device cpu --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path: the phantom the pretraining benchmark makes.
from pretrain_throughput import make_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "loopback_torchrun.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(args: argparse.Namespace, data: Path, out: Path, procs: int) -> dict[str, Any]:
    """One torchrun of the engine; its views/s from the run's TensorBoard events."""
    threads = max(1, (os.cpu_count() or 1) // procs) if args.device == "cpu" else 4
    command = [sys.executable, str(LAUNCHER), "--nnodes=1", f"--nproc-per-node={procs}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               "-m", "pretrain", f"data.path={data}", f"run.out={out}",
               f"run.device={args.device}", "run.progress=false", "run.log_every=1",
               f"model.arch={args.arch}", f"data.crop_size={args.crop}",
               f"data.batch_size={args.batch}", f"data.workers={args.workers}",
               f"data.epoch_samples={args.batch * args.steps}", "optim.epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {procs}-process run failed:\n{done.stderr[-3000:]}")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rates = [e.value for e in events.Scalars("perf/views_per_s")][args.skip:]
    if not rates:
        raise SystemExit(f"error: {out}: no perf/views_per_s after {args.skip} warm-up logs")
    return {"procs": procs, "threads_per_proc": threads, "wall_s": wall,
            "views_per_s": {"median": statistics.median(rates), "min": min(rates),
                            "max": max(rates)}, "logged_steps": len(rates)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the phantom and runs (default: temporary)")
    parser.add_argument("--data", help="prepared dataset (default: a phantom one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--procs", type=int, default=2, help="processes of the scaled run")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="logged steps left out (warm-up)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers per process")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-scaling-"))
    data = Path(args.data) if args.data else make_dataset(work, args.image_size, args.patients)
    runs = [launch(args, data, work / f"run_{n}proc", n) for n in (1, args.procs)]
    one, many = runs[0]["views_per_s"]["median"], runs[1]["views_per_s"]["median"]
    result = {"device": args.device, "cpus": os.cpu_count(), "arch": args.arch,
              "global_batch": args.batch, "crop": args.crop, "runs": runs,
              "scaling": many / one}
    backend = "gloo" if args.device == "cpu" else "nccl"
    print(f"\npretraining scaling ({backend}, {os.cpu_count()} CPU cores): {args.arch}, "
          f"global batch {args.batch}, {args.crop} px, {args.steps} steps\n")
    print("| processes | threads each | views/s (median, min-max) | wall s |")
    print("|---:|---:|---:|---:|")
    for run in runs:
        rate = run["views_per_s"]
        print(f"| {run['procs']} | {run['threads_per_proc']} | {rate['median']:.1f} "
              f"({rate['min']:.1f}-{rate['max']:.1f}) | {run['wall_s']:.1f} |")
    print(f"\n{args.procs} processes / 1 process: {result['scaling']:.2f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
