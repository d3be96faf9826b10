"""Every stage's benchmark, each next to its same-run baseline, as one suite.

    python benchmarks/run.py                 # CPU sizes: under 10 minutes on 2 cores
    python benchmarks/run.py --gpu           # GPU sizes: under 8 minutes on one GPU
    python benchmarks/run.py --only finetune packing
    python benchmarks/run.py --tiny          # seconds per stage: that each runs (tests)

Each stage runs its script (in this folder) as a subprocess, reads the figures the
script prints as its last JSON line (or writes with ``--json``), and reports one
headline: medssl's figure, the baseline's from the same run, their ratio, the hardware.
The whole set is written as JSON (``--json``, default ``benchmarks/results/DATE-PROFILE
.json``) and appended to ``benchmarks/RESULTS.md`` (``--results``) with date, commit,
hardware and command. A stage that fails is reported as failed and the suite goes on;
the exit status is 1 if any failed.

Stages:

- ``prepare``: dataset conversion, ``prepare`` with every core vs a plain NIfTI-to-.npy
  loop (slices/s);
- ``loader``: the shard loader + augmentation vs a PIL + torchvision DataLoader (views/s);
  on a GPU also against what the compiled ResNet-50 step consumes (target >= 1.3x) and
  the data wait of the real path (target < 5%);
- ``loader_s3``: the same loader (read + decode) reading the loader stage's dataset from
  moto's S3 server on loopback through a proxy adding 20 ms per request vs from local
  files (views/s; target >= 0.9x), also without the latency and with ``read_ahead`` 1;
- ``pretrain_resnet50``, ``pretrain_vit``: the real pretraining path (loader, augmentation,
  medssl's BYOL step, both views in one pass as the baseline) vs a plain timm + PyTorch
  step on random tensors (views/s); the note gives the cost of one pass per view;
- ``finetune``: medssl's fine-tuning step vs a plain smp U-Net loop (images/s), with a
  validation pass, a whole epoch and the reference grid's projected device-hours;
- ``sweep``: trials through Ray Tune vs the same trials in a plain loop (trials/min);
- ``packing``: 2 (GPU: 8) fine-tuning trials at once on one device vs one at a time
  (images/s in total);
- ``scaling``: pretraining under torchrun with 2 processes vs 1 (views/s; gloo on CPU,
  NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILES = ("tiny", "cpu", "gpu")


@dataclass
class Stage:
    name: str
    script: str
    what: str  # the figure, e.g. "views/s"
    arguments: Callable[[str, Path], list[str]]  # (profile, work) -> script arguments
    headline: Callable[[dict[str, Any]], tuple[float, float, str]]  # figure, baseline, note
    json_flag: bool = False  # the script writes its JSON with --json (else: last line)
    # (profile) -> why the stage cannot run here, or None
    unavailable: Callable[[str], str | None] = lambda profile: None


@dataclass
class Outcome:
    stage: str
    what: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    note: str
    seconds: float
    error: str | None = None
    skipped: str | None = None


def _sizes(profile: str, tiny: list[str], cpu: list[str], gpu: list[str]) -> list[str]:
    return {"tiny": tiny, "cpu": cpu, "gpu": gpu}[profile]


def _prepare_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "prepare"), *_sizes(
        profile, ["--patients", "2", "--image-size", "32", "--repeats", "1"],
        ["--patients", "12", "--image-size", "192", "--repeats", "2"],
        ["--patients", "24", "--image-size", "256", "--repeats", "2"])]


def _prepare_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    name = next(k for k in result if k.startswith("prepare-") and k != "prepare-1")
    return (result[name]["slices_per_s"], result["baseline"]["slices_per_s"],
            f"{name}, {result['files']} NIfTI files")


def _loader_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "loader"), "--only", "webdataset", *_sizes(
        profile,
        ["--patients", "2", "--image-size", "48", "--crop", "32", "--batch", "8",
         "--workers", "1", "--warmup", "1", "--timed", "4"],
        ["--patients", "4", "--image-size", "128", "--crop", "96", "--batch", "32",
         "--workers", "1", "--warmup", "4", "--timed", "32"],
        ["--patients", "12", "--image-size", "256", "--crop", "224", "--batch", "256",
         "--workers", "8", "--warmup", "4", "--timed", "40", "--compile"])]


def _loader_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    rows = result["rows"]
    ours = max(r["views_per_s"] or 0.0 for r in rows if r["path"] == "webdataset")
    base = max(r["views_per_s"] or 0.0 for r in rows if r["path"] == "baseline")
    consumption = result.get("consumption_views_per_s")
    note = "" if consumption is None else \
        f"loader / ResNet-50 step consumption {ours / consumption:.2f} (target >= 1.3)"
    return ours, base, note


def _loader_s3_args(profile: str, work: Path) -> list[str]:
    # the loader stage's folder: its phantom dataset is reused
    return ["--work", str(work / "loader"), *_sizes(
        profile,
        ["--patients", "2", "--image-size", "48", "--batch", "8", "--workers", "1",
         "--warmup", "1", "--timed", "3", "--read-ahead", "2"],
        ["--patients", "4", "--image-size", "128", "--batch", "32", "--workers", "1", "2",
         "--warmup", "8", "--timed", "96"],
        ["--patients", "12", "--image-size", "256", "--batch", "256", "--workers", "4", "8",
         "--warmup", "2", "--timed", "24"])]


def _loader_s3_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    rows = result["rows"]
    latency = [r for r in rows if r["source"].startswith("s3 +")]
    # the default read-ahead, or the deepest measured when the run left it out
    depths = {r["read_ahead"] for r in latency}
    depth = result["default_read_ahead"] if result["default_read_ahead"] in depths \
        else max(depths)
    ours = max((r for r in latency if r["read_ahead"] == depth), key=lambda r: r["workers"])
    local = next(r for r in rows if r["source"] == "local" and r["workers"] == ours["workers"])
    serial = [r for r in latency if r["read_ahead"] == 1 and r["workers"] == ours["workers"]]
    note = (f"{ours['source']}, {ours['workers']} worker(s), read_ahead {depth} vs local "
            f"(target >= 0.9); {ours['vs_s3']:.2f}x s3 without the latency")
    if serial:
        note += f"; read_ahead 1: {serial[0]['vs_local']:.2f}x local"
    if ours["server_cores"] is not None:
        note += (f"; CPU cores: loader {ours['loader_cores']:.2f}, moto server "
                 f"{ours['server_cores']:.2f}, other processes {ours['other_cores']:.2f}")
    return ours["views_per_s"], local["views_per_s"], note


def _pretrain_args(arch: str) -> Callable[[str, Path], list[str]]:
    def arguments(profile: str, work: Path) -> list[str]:
        return ["--work", str(work / "pretrain"), "--arch", arch, *_sizes(
            profile,
            ["--patients", "3", "--image-size", "48", "--crop", "32", "--batch", "4",
             "--workers", "1", "--steps", "2", "--warmup", "1", "--repeats", "2",
             "--projector-hidden", "64", "--probe-steps", "10"],
            ["--patients", "4", "--image-size", "96", "--crop", "64", "--batch", "16",
             "--workers", "1", "--steps", "4", "--warmup", "2"],
            ["--patients", "12", "--image-size", "256", "--crop", "224", "--batch", "256",
             "--workers", "10", "--steps", "20", "--warmup", "5", "--precision", "bf16",
             "--compile"])]
    return arguments


def _pretrain_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    probe = result.get("probe_share")
    return (result["real_views_per_s"], result["plain_views_per_s"],
            f"data wait {100 * result['data_wait_fraction']:.1f}% (target < 5%), loader / "
            f"step consumption {result['loader_over_consumption']:.2f}, one pass per view "
            f"{result['separate_over_joint']:.2f}x joint"
            + ("" if probe is None else f", segmentation probe {100 * probe:.1f}% of wall "
               "time at one per epoch (target < 5%)"))


def _finetune_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "finetune"), *_sizes(
        profile,
        ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--patients", "4",
         "--batch", "4", "--val-batch", "8", "--steps", "2", "--warmup", "1", "--repeats",
         "2", "--modes", "eager", "--epoch-samples", "8"],
        ["--device", "cpu", "--arch", "resnet50", "--image-size", "64", "--batch", "8",
         "--val-batch", "32", "--steps", "3", "--warmup", "1", "--repeats", "3", "--modes",
         "eager", "--epoch-samples", "32"],
        ["--device", "cuda", "--packing", str(work / "packing.json")])]


def _finetune_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    mode = "compiled" if "compiled" in result["modes"] else next(iter(result["modes"]))
    figures = result["modes"][mode]
    one = result["projection"][0]["gpu_hours"]
    return (figures["real"]["step"]["median"], figures["plain"]["median"],
            f"{mode}; validation pass {figures['real']['val_pass_s']:.2f} s, epoch "
            f"{figures['real']['epoch_s']:.1f} s; reference grid {one:.0f} device-hours "
            "at 1 run per device")


def _sweep_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "sweep"), *_sizes(
        profile,
        ["--trials", "2", "--epochs", "1", "--image-size", "32", "--patients", "4",
         "--batch", "4", "--epoch-samples", "4", "--budget", "4", "--no-concurrent"],
        ["--trials", "4", "--epochs", "2"],
        ["--trials", "4", "--epochs", "2"])]


def _sweep_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    variants = {v["name"][:2]: v for v in result["variants"]}
    trials = result["settings"]["trials"]
    ray, plain = variants["b."], variants["a."]
    figures = result["figures"]
    return (60 * trials / ray["wall_s"], 60 * trials / plain["wall_s"],
            f"Ray start-up {figures['ray_startup_s']:.1f} s, "
            f"{figures['ray_overhead_per_trial_s']:.2f} s per trial")


def _packing_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "packing"), *_sizes(
        profile,
        ["--device", "cpu", "--concurrency", "1", "2", "--rounds", "1", "--arch",
         "resnet18", "--image-size", "32", "--patients", "4", "--epochs", "1", "--batch",
         "4", "--epoch-samples", "8"],
        ["--device", "cpu", "--concurrency", "1", "2", "--rounds", "1", "--arch",
         "resnet18", "--image-size", "64", "--epochs", "1", "--batch", "8",
         "--epoch-samples", "32"],
        ["--device", "cuda", "--concurrency", "1", "2", "4", "8", "--rounds", "1",
         "--image-size", "224", "--epochs", "2", "--batch", "32", "--epoch-samples",
         "512"])]


def _packing_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    launches = {x["concurrent"]: x for x in result["launches"]}
    most = max(launches)
    busy = launches[most]["busy"]
    return (launches[most]["images_per_s"], launches[1]["images_per_s"],
            f"{most} at once vs 1" + ("" if busy is None else f", busy {busy:.0%}"))


def _scaling_args(profile: str, work: Path) -> list[str]:
    return ["--work", str(work / "scaling"), "--procs", "2", *_sizes(
        profile,
        ["--device", "cpu", "--image-size", "48", "--crop", "32", "--patients", "3",
         "--batch", "8", "--steps", "4", "--skip", "1"],
        ["--device", "cpu"],
        ["--device", "cuda", "--arch", "resnet50", "--crop", "224", "--image-size", "256",
         "--batch", "256", "--steps", "20", "--workers", "6"])]


def _needs_ray(profile: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("ray") else "Ray is not installed here"


def _needs_two_gpus(profile: str) -> str | None:
    if profile != "gpu":
        return None
    import torch

    count = torch.cuda.device_count()
    return None if count >= 2 else f"NCCL scaling needs 2 GPUs, this machine has {count}"


def _scaling_headline(result: dict[str, Any]) -> tuple[float, float, str]:
    one, many = (r["views_per_s"]["median"] for r in result["runs"])
    return many, one, f"{result['runs'][1]['procs']} processes vs 1"


STAGES = [
    Stage("prepare", "prepare_throughput.py", "slices/s", _prepare_args, _prepare_headline),
    Stage("loader", "loader_throughput.py", "views/s", _loader_args, _loader_headline),
    Stage("loader_s3", "loader_s3.py", "views/s", _loader_s3_args, _loader_s3_headline),
    Stage("pretrain_resnet50", "pretrain_throughput.py", "views/s",
          _pretrain_args("resnet50"), _pretrain_headline),
    Stage("pretrain_vit", "pretrain_throughput.py", "views/s",
          _pretrain_args("vit_small_patch16_224"), _pretrain_headline),
    # packing before finetune: on a GPU the fine-tuning projection reads its JSON
    Stage("packing", "finetune_packing.py", "images/s", _packing_args, _packing_headline,
          json_flag=True),
    Stage("finetune", "finetune_throughput.py", "images/s", _finetune_args,
          _finetune_headline, json_flag=True),
    Stage("sweep", "sweep_overhead.py", "trials/min", _sweep_args, _sweep_headline,
          json_flag=True, unavailable=_needs_ray),
    Stage("scaling", "pretrain_scaling.py", "views/s", _scaling_args, _scaling_headline,
          unavailable=_needs_two_gpus),
]


def run_stage(stage: Stage, profile: str, work: Path) -> tuple[Outcome, dict[str, Any] | None]:
    """Run one stage's script; its headline figures, or the error it ended with."""
    reason = stage.unavailable(profile)
    if reason is not None:
        print(f"== {stage.name}: skipped ({reason})", flush=True)
        return Outcome(stage.name, stage.what, None, None, None, "", 0.0, skipped=reason), None
    arguments = stage.arguments(profile, work)
    output = work / f"{stage.name}.json"
    if stage.json_flag:
        arguments += ["--json", str(output)]
    command = [sys.executable, str(HERE / stage.script), *arguments]
    print(f"== {stage.name}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=3600)
    except subprocess.TimeoutExpired:
        return Outcome(stage.name, stage.what, None, None, None, "", 3600.0, "timed out"), None
    seconds = time.perf_counter() - start
    print(done.stdout[-4000:], flush=True)
    if done.returncode:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        return Outcome(stage.name, stage.what, None, None, None, "", seconds, error), None
    try:
        result = json.loads(output.read_text()) if stage.json_flag else \
            _last_json_line(done.stdout)
        figure, baseline, note = stage.headline(result)
    except (ValueError, KeyError, StopIteration, OSError) as exc:
        return Outcome(stage.name, stage.what, None, None, None, "", seconds,
                       f"unreadable figures: {type(exc).__name__}: {exc}"), None
    ratio = figure / baseline if baseline else None
    return Outcome(stage.name, stage.what, figure, baseline, ratio, note, seconds), result


def _last_json_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the script printed no JSON line")


def hardware(profile: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if profile == "gpu":
        try:
            import torch

            text = f"{torch.cuda.get_device_name(0)}, {text}"
        except Exception as exc:  # reported in the table; the stages fail on their own
            text = f"no usable GPU ({type(exc).__name__}), {text}"
    return text


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO)
    return done.stdout.strip() or "unknown"


def table(outcomes: list[Outcome]) -> str:
    lines = ["| stage | medssl | baseline | ratio | unit | s | note |",
             "|---|---:|---:|---:|---|---:|---|"]
    for o in outcomes:
        if o.skipped is not None:
            lines.append(f"| {o.stage} | skipped | | | {o.what} | | {o.skipped} |")
            continue
        if o.error is not None:
            lines.append(f"| {o.stage} | failed | | | {o.what} | {o.seconds:.0f} | "
                         f"{o.error.replace('|', '/')} |")
            continue
        ratio = f"{o.ratio:.2f}" if o.ratio is not None else ""
        lines.append(f"| {o.stage} | {o.figure:.1f} | {o.baseline:.1f} | {ratio} | {o.what} | "
                     f"{o.seconds:.0f} | {o.note} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--gpu", action="store_true", help="GPU sizes (one GPU)")
    sizes.add_argument("--tiny", action="store_true", help="tiny sizes: only that it runs")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STAGES],
                        metavar="NAME", help="these stages only")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"),
                        help="markdown file the table is appended to ('' for none)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each stage's command and run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = "gpu" if args.gpu else "tiny" if args.tiny else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-benchmarks-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STAGES if args.only is None or s.name in args.only]
    if args.dry_run:
        for stage in chosen:
            extra = ["--json", str(work / f"{stage.name}.json")] if stage.json_flag else []
            print(f"{stage.name}: python {HERE / stage.script} "
                  f"{' '.join([*stage.arguments(profile, work), *extra])}")
        return 0
    started = dt.datetime.now(dt.UTC)
    outcomes, results = [], {}
    for stage in chosen:
        outcome, result = run_stage(stage, profile, work)
        outcomes.append(outcome)
        results[stage.name] = result
    machine = hardware(profile)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(outcomes)
    print(f"\nbenchmarks ({profile} sizes) on {machine}, commit {commit()}\n\n{text}")
    record = {"date": started.isoformat(timespec="seconds"), "commit": commit(),
              "hardware": machine, "profile": profile, "command": command,
              "stages": [asdict(o) for o in outcomes], "figures": results}
    json_path = Path(args.json) if args.json else \
        HERE / "results" / f"{started:%Y%m%d-%H%M%S}-{profile}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as markdown:
            markdown.write(f"\n### Suite, {profile} sizes: {machine}, {started:%Y-%m-%d}, "
                           f"commit {record['commit']}\n\nCommand: `{command}`\n\n{text}\n")
    print(f"\nresults: {json_path}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
