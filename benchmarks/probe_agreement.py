"""Does the live segmentation probe rank pretraining checkpoints as fine-tuning does?

On the phantom: BYOL pretraining with the probe after every epoch and checkpoints kept at
several epochs; then a fine-tuning sweep (Ray Tune, local instance on 127.0.0.1) over an
``epochs:`` series of those checkpoints plus random initialisation, at a small label
budget and several seeds; then the study report. Printed: the probe Dice and the mean
fine-tuned test Dice at each kept epoch (random paired with the probe's epoch 0, the
initialisation), and Spearman's rank correlation between them, with and without random.

CPU (2 cores, about 10 minutes)::

    python benchmarks/probe_agreement.py --work /tmp/medssl-probe
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
from scipy import stats

# Run as a script, this folder is on sys.path: the phantom the sweep benchmark makes.
from sweep_overhead import kept_cwd, make_phantom

from cluster.ray_local import prepare_local_environment
from pretrain.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    RunConfig,
)
from pretrain.probe_log import PROBE_FILE, read_probe_log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/medssl-probe")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--kept", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--budget", type=int, default=8, help="labeled slices per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--finetune-samples", type=int, default=32,
                        help="training images per fine-tuning epoch (oversampled budget)")
    parser.add_argument("--noise", type=float, nargs=2, metavar=("LO", "HI"),
                        help="phantom noise range (PhantomConfig.noise); harder when higher")
    parser.add_argument("--contrast", type=float,
                        help="phantom tissue contrast factor; harder below 1")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--probe-budget", type=int, default=32)
    parser.add_argument("--probe-decoder", action="store_true")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def pretrain_with_probe(args: argparse.Namespace, data: Path, out: Path) -> Path:
    from pretrain.engine import pretrain

    config = PretrainConfig(
        data=DataConfig(path=str(data), crop_size=48, batch_size=32, workers=1,
                        epoch_samples=256),
        model=ModelConfig(arch="resnet18"),
        method=MethodConfig(projector_hidden=256, projection_dim=64),
        optim=OptimConfig(lr=2e-3, epochs=args.pretrain_epochs, warmup_epochs=1),
        run=RunConfig(out=str(out), device="cpu", progress=False, log_every=8,
                      keep_epochs=list(args.kept)),
        probe=ProbeConfig(every_epochs=1, budget=args.probe_budget, val_volumes=6,
                          steps=args.probe_steps, decoder=args.probe_decoder))
    pretrain(config)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    prepare_local_environment()  # before Ray is imported
    from finetune.sweep import run_sweep
    from finetune.sweep_config import load_sweep_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phantom = {key: value for key, value in (("noise", args.noise and tuple(args.noise)),
                                               ("contrast", args.contrast)) if value}
    data = make_phantom(work, args.image_size, args.patients, **phantom)
    run = pretrain_with_probe(args, data, work / "byol")
    config = load_sweep_config({
        "name": "probe-check", "storage": str(work / "storage"), "data": str(data),
        "base": {"arch": "resnet18", "epochs": args.finetune_epochs, "batch_size": 8,
                 "epoch_samples": args.finetune_samples, "lr": 2e-3, "overlays": 0,
                 "device": "cpu", "progress": False},
        "inits": {"random": "random", "byol": {"run": str(run), "epochs": args.kept}},
        "budgets": [args.budget], "seeds": list(range(args.seeds)),
        "resources": {"cpu": 1}, "max_failures": 0, "table_every": 3600})
    with kept_cwd():
        outcome = run_sweep(config, num_cpus=os.cpu_count() or 2)
    results = pd.read_csv(config.sweep_dir / "results.csv")
    downstream = results.groupby("init")["test_dice"].mean()
    probe = {row["epoch"]: row["dice"] for row in read_probe_log(run / PROBE_FILE)}
    pairs = [(0.0, probe[0.0], downstream["random"])] + [
        (float(e), probe[float(e)], downstream[f"byol-ep{e:04d}"]) for e in args.kept]
    with_random = stats.spearmanr([p for _, p, _ in pairs], [d for _, _, d in pairs])
    kept_only = stats.spearmanr([p for _, p, _ in pairs[1:]], [d for _, _, d in pairs[1:]])
    agreement = pd.read_csv(config.sweep_dir / "report" / "tables" / "probe_agreement.csv")
    print(f"\nprobe vs fine-tuning on the phantom ({args.patients} patients, "
          f"{args.image_size} px, {phantom or 'default difficulty'}): {args.seeds} seeds at "
          f"{args.budget} slices, {time.perf_counter() - start:.0f} s in all\n")
    print("| pretraining epoch | init | probe Dice | mean test Dice |")
    print("|---:|---|---:|---:|")
    for epoch, dice, test in pairs:
        init = "random" if epoch == 0 else f"byol-ep{int(epoch):04d}"
        print(f"| {int(epoch)} | {init} | {dice:.3f} | {test:.3f} |")
    print(f"\nSpearman: kept checkpoints {kept_only.statistic:.2f} (n {len(pairs) - 1}), "
          f"with random as epoch 0 {with_random.statistic:.2f} (n {len(pairs)}); "
          f"the report's table: {agreement.to_dict('records')}")
    print(f"report: {outcome.report}")
    figures = {"pairs": pairs, "spearman_kept": kept_only.statistic,
               "spearman_with_random": with_random.statistic,
               "report_agreement": agreement.to_dict("records")}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float))
    return figures


if __name__ == "__main__":
    main()
