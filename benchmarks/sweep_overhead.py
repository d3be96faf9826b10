"""Ray sweep overhead: N short fine-tuning trials through Ray Tune against a plain loop.

Three variants train the same N trials (one init, one label budget, seeds 0..N-1) on the
same phantom dataset, one after another in this process, each in a storage folder of its
own so no run folder is reused:

a. plain    -- ``finetune.grid.run_grid``: the trials one after another in this process,
               torch threads = all cores (the baseline);
b. ray x1   -- ``finetune.sweep.run_sweep`` on a local Ray instance, one trial at a time
               holding every core (``resources.cpu`` = cores, ``max_concurrent=1``):
               the same work as (a), so (b - a) / N is Ray's cost per trial;
c. ray x2   -- the same sweep with 1 CPU per trial, so two trials run at once on two
               cores: a / c is the speed-up packing gives.

Per-trial times come from the run folders, so the overhead is visible next to the work:
a trial ends when its ``metrics.json`` (written last) is written; a Ray trial began
``wall_seconds`` (``sweep_trial.json``, timed inside the trial) before that; in the plain
loop a trial begins when the previous one ended. "training" is the run's own per-epoch
``seconds`` (train + validation); a trial's wall time adds loading the data, building the
U-Net, testing and writing its outputs. Example (CPU, 2 cores, under 2 minutes)::

    python benchmarks/sweep_overhead.py --work /tmp/medssl-sweep --json /tmp/sweep.json

Only a local instance on 127.0.0.1 is started, through ``run_sweep`` without an address
(``cluster.ray_local``); ``run_sweep`` shuts it down before returning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.ray_local import prepare_local_environment
from data_prep.phantom import PhantomConfig, write_acdc_tree
from data_prep.prepare import PrepareConfig, prepare_dataset
from finetune.grid import run_grid
from finetune.run_metrics import METRICS_FILE, read_run_metrics
from finetune.sweep_config import (
    TRIAL_FILE,
    SweepConfig,
    Trial,
    base_config,
    load_sweep_config,
    plan_trials,
)
from finetune.train import read_starts

INIT = {"random": "random"}


@dataclass
class TrialTimes:
    """One trial's timeline (epoch seconds, ``time.time()`` clock) and its training time."""

    begin: float
    first_start: float  # training began (starts.jsonl): data loaded, U-Net built
    end: float
    training_s: float  # the run's own train + validation seconds
    torch_threads: int | None

    @property
    def wall_s(self) -> float:
        return self.end - self.begin


@dataclass
class Variant:
    """One measured way of running the N trials."""

    name: str
    concurrent: int
    cpus_per_trial: int
    wall_s: float
    to_first_trial_s: float  # from the call to the first trial's begin
    after_last_trial_s: float  # from the last trial's end to the call's return
    trial_wall_s: float  # sum over trials
    trial_setup_s: float  # sum of begin -> training start (data, U-Net)
    training_s: float  # sum of the runs' epoch seconds
    torch_threads: list[int | None]
    load_before: float  # 1-minute load average: other work on the machine skews a variant
    load_after: float

    @property
    def between_trials_s(self) -> float:
        """Wall time no trial covered, outside start-up and wind-down (serial variants)."""
        return self.wall_s - self.to_first_trial_s - self.after_last_trial_s \
            - self.trial_wall_s / self.concurrent


# --- the dataset -------------------------------------------------------------------------

def make_phantom(work: Path, image_size: int, patients: int, **phantom: Any) -> Path:
    """A small prepared phantom (as the tests' fixture), made once and reused from ``work``;
    ``phantom`` holds further PhantomConfig keys (noise, contrast, slices, frames)."""
    shape = {"slices": (4, 6), "frames": (6, 8), **phantom}
    tag = "".join(f"_{key}{value}" for key, value in sorted(phantom.items()))
    tag = tag.replace(" ", "").replace("(", "").replace(")", "").replace(",", "-")
    raw, prepared = work / f"phantom_acdc{tag}", work / f"prepared_{image_size}{tag}"
    if not (prepared / "manifest.json").is_file():
        shutil.rmtree(raw, ignore_errors=True)
        write_acdc_tree(raw, patients, seed=7,
                        config=PhantomConfig.for_image_size(image_size, **shape))
        # one process: a pool's spawned workers would re-import the calling script
        prepare_dataset(PrepareConfig(source=str(raw), out=str(prepared), name="phantom",
                                      image_size=image_size, min_shards=2, workers=1),
                        progress=False)
    return prepared


# --- the sweeps --------------------------------------------------------------------------

def sweep_config(args: argparse.Namespace, data: Path, name: str, cpus: int,
                 concurrent: int) -> SweepConfig:
    """The same N trials for every variant; only the storage folder and resources differ."""
    base = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch,
            "epoch_samples": args.epoch_samples, "lr": 0.002, "overlays": 0,
            "device": "cpu", "progress": False}
    return load_sweep_config({
        "name": name, "storage": str(Path(args.work) / "storage"), "data": str(data),
        "base": base, "inits": INIT, "budgets": [args.budget],
        "seeds": list(range(args.trials)), "resources": {"cpu": cpus},
        "max_concurrent": concurrent, "max_failures": 0, "table_every": 3600})


def fresh(config: SweepConfig) -> SweepConfig:
    """Delete the variant's folder from an earlier benchmark run: finished run folders
    would be returned as they are, and nothing trained."""
    shutil.rmtree(config.sweep_dir, ignore_errors=True)
    return config


@contextmanager
def kept_cwd():
    """``run_sweep`` changes the process's working directory to the sweep folder; the
    later variants and the caller should not inherit it."""
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def run_plain(config: SweepConfig, cores: int) -> None:
    torch.set_num_threads(cores)
    run_grid(base_config(config), INIT, config.budgets, config.seeds, config.runs_dir,
             progress=False)


def run_ray(config: SweepConfig, cores: int) -> None:
    from finetune.sweep import run_sweep

    with kept_cwd():
        outcome = run_sweep(config, num_cpus=cores)
    if not outcome.results.complete:
        raise RuntimeError(f"sweep {config.name}: {len(outcome.results.unfinished)} trials "
                           f"unfinished ({outcome.where})")


# --- reading the run folders -------------------------------------------------------------

def trial_times(trials: list[Trial], serial_begin: float | None) -> list[TrialTimes]:
    """Each trial's timeline from its run folder, in the order the trials ended.

    ``serial_begin``: the plain loop's start (each trial begins where the previous one
    ended); None for Ray trials, which time themselves (``sweep_trial.json``).
    """
    rows = []
    for trial in trials:
        run = Path(trial.run_dir)
        metrics = read_run_metrics(run / METRICS_FILE)
        info_path = run / TRIAL_FILE
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        # the trial's last write: sweep_trial.json (Ray, after train_run) or metrics.json
        end = (info_path if info else run / METRICS_FILE).stat().st_mtime
        begin = end - info["wall_seconds"] if "wall_seconds" in info else float("nan")
        rows.append(TrialTimes(begin, read_starts(run)[0]["time"], end,
                               metrics.epochs[-1].seconds, info.get("torch_threads")))
    rows.sort(key=lambda t: t.end)
    if serial_begin is not None:
        previous = serial_begin
        for row in rows:
            row.begin, previous = previous, row.end
    return rows


def measure(name: str, run: Callable[[], None], config: SweepConfig, concurrent: int,
            cpus_per_trial: int, serial: bool) -> Variant:
    print(f"== {name}: {len(config.seeds)} trials, {concurrent} at once, "
          f"{cpus_per_trial} CPU each", flush=True)
    load_before = os.getloadavg()[0]
    started_at, start = time.time(), time.perf_counter()
    run()
    wall, ended_at = time.perf_counter() - start, time.time()
    times = trial_times(plan_trials(config), started_at if serial else None)
    return Variant(
        name, concurrent, cpus_per_trial, wall,
        to_first_trial_s=min(t.begin for t in times) - started_at,
        after_last_trial_s=ended_at - max(t.end for t in times),
        trial_wall_s=sum(t.wall_s for t in times),
        trial_setup_s=sum(t.first_start - t.begin for t in times),
        training_s=sum(t.training_s for t in times),
        torch_threads=[t.torch_threads for t in times],
        load_before=load_before, load_after=os.getloadavg()[0])


# --- report ------------------------------------------------------------------------------

def time_checks(config: SweepConfig) -> float:
    """Seconds of the checks ``run_sweep`` makes before it starts Ray (dataset, every
    init loaded, budgets), timed on their own to split the sweep's start-up."""
    from finetune.sweep_checks import check_sweep

    start = time.perf_counter()
    check_sweep(config)
    return time.perf_counter() - start


def figures(plain: Variant, serial: Variant, packed: Variant | None, trials: int,
            checks_s: float) -> dict[str, float]:
    """The issue's three figures, plus where Ray's time goes (no speed-up without c)."""
    startup = serial.to_first_trial_s - plain.to_first_trial_s
    result = {
        "ray_overhead_per_trial_s": (serial.wall_s - plain.wall_s) / trials,
        "ray_startup_s": startup,
        "sweep_checks_s": checks_s,
        "ray_tune_startup_s": startup - checks_s,
        "ray_wind_down_s": serial.after_last_trial_s - plain.after_last_trial_s,
        "ray_between_trials_per_trial_s": serial.between_trials_s / trials,
        "ray_in_trial_extra_per_trial_s": (serial.trial_wall_s - plain.trial_wall_s) / trials,
    }
    if packed is not None:
        result["speedup_2_concurrent"] = plain.wall_s / packed.wall_s
        result["speedup_2_concurrent_excluding_startup"] = \
            trials_span(plain) / trials_span(packed)
    return result


def trials_span(variant: Variant) -> float:
    """Wall time from the first trial's begin to the last one's end."""
    return variant.wall_s - variant.to_first_trial_s - variant.after_last_trial_s


def print_table(variants: list[Variant], trials: int) -> None:
    print("| variant | at once x CPUs | wall s | to 1st trial s | trials' wall s | "
          "in-trial setup s | training s | between trials s | after last s | wall/trial s | "
          "load before/after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        between = f"{round(v.between_trials_s, 1) + 0.0:.1f}" if v.concurrent == 1 else ""
        print(f"| {v.name} | {v.concurrent} x {v.cpus_per_trial} | {v.wall_s:.1f} | "
              f"{v.to_first_trial_s:.1f} | {v.trial_wall_s:.1f} | {v.trial_setup_s:.1f} | "
              f"{v.training_s:.1f} | {between} | {v.after_last_trial_s:.1f} | "
              f"{v.wall_s / trials:.2f} | {v.load_before:.1f} / {v.load_after:.1f} |")


def print_figures(result: dict[str, float]) -> None:
    print(f"\nRay overhead per trial, (b - a) / N:          "
          f"{result['ray_overhead_per_trial_s']:.2f} s")
    print(f"  of it Ray start-up (to the first trial):    {result['ray_startup_s']:.1f} s "
          f"= sweep checks {result['sweep_checks_s']:.1f} s + Ray and Tune "
          f"{result['ray_tune_startup_s']:.1f} s")
    print(f"  wind-down (results, summary, shutdown):     {result['ray_wind_down_s']:.1f} s")
    print(f"  between trials, per trial:                  "
          f"{result['ray_between_trials_per_trial_s']:.2f} s")
    print(f"  inside the trial (vs the plain loop's):     "
          f"{result['ray_in_trial_extra_per_trial_s']:.2f} s")
    if "speedup_2_concurrent" not in result:
        return
    print(f"speed-up, 2 trials at once x 1 CPU, a / c:    "
          f"{result['speedup_2_concurrent']:.2f}x "
          f"({result['speedup_2_concurrent_excluding_startup']:.2f}x without start-up and "
          "wind-down)")


# --- main --------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None,
                        help="folder for the phantom (reused) and the three sweeps (replaced)")
    parser.add_argument("--trials", type=int, default=8, help="N: trials per variant")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64, help="phantom slice size, px")
    parser.add_argument("--patients", type=int, default=12, help="phantom patients")
    parser.add_argument("--arch", default="resnet18", help="U-Net encoder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epoch-samples", type=int, default=16)
    parser.add_argument("--budget", type=int, default=8, help="labeled training slices")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="CPUs of the local Ray instance and threads of the plain loop")
    parser.add_argument("--no-concurrent", action="store_true",
                        help="skip variant c (two trials at once; a second Ray start)")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.cores < 2 and not args.no_concurrent:
        raise SystemExit("error: --cores must be >= 2 (variant c runs two trials at once)")
    prepare_local_environment()  # before ray is first imported (by run_sweep)
    keep = args.work is not None
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-sweep-bench-"))
    args.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_phantom(work, args.image_size, args.patients)
    cores = args.cores
    plain_cfg = fresh(sweep_config(args, data, "plain", cores, 1))
    serial_cfg = fresh(sweep_config(args, data, "ray-x1", cores, 1))
    packed_cfg = None if args.no_concurrent else fresh(sweep_config(args, data, "ray-x2", 1, 2))
    checks_s = time_checks(serial_cfg)
    start = time.perf_counter()
    variants = [
        measure("a. plain loop (run_grid)", lambda: run_plain(plain_cfg, cores), plain_cfg,
                1, cores, serial=True),
        measure("b. Ray sweep, 1 at once", lambda: run_ray(serial_cfg, cores), serial_cfg,
                1, cores, serial=False),
    ]
    if packed_cfg is not None:
        variants.append(measure("c. Ray sweep, 2 at once", lambda: run_ray(packed_cfg, 2),
                                packed_cfg, 2, 1, serial=False))
    result = figures(variants[0], variants[1], variants[2] if packed_cfg else None,
                     args.trials, checks_s)
    print(f"\nsweep overhead on {os.cpu_count()} CPU cores (torch {torch.__version__}): "
          f"{args.trials} trials of {args.arch} U-Net, {args.image_size} px, {args.epochs} "
          f"epochs x {args.epoch_samples} samples, batch {args.batch}, budget {args.budget}; "
          f"measured in {time.perf_counter() - start:.0f} s\n")
    print_table(variants, args.trials)
    print_figures(result)
    threads = {v.name: sorted({t for t in v.torch_threads if t is not None}) for v in variants}
    print(f"torch threads in the Ray trials: {threads}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "variants": [{**asdict(v), "between_trials_s": v.between_trials_s}
                         for v in variants],
            "figures": result}, indent=2))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
