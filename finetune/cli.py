"""``python -m finetune``: fine-tune a U-Net, run a sweep on Ray, write a report, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cluster.cli_errors import report_input_errors
from cluster.config import load_config
from cluster.storage import join


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one fine-tuning run")
    train.add_argument("--config", help="YAML file of FinetuneConfig keys")
    train.add_argument("--data", help="prepared dataset: a folder or an s3:// URL")
    for flag in ("out", "init", "arch"):
        train.add_argument(f"--{flag}")
    train.add_argument("--budget", type=int, help="annotated training slices (or patients, "
                       "with budget_unit=patients); 0 = the whole training split")
    train.add_argument("--seed", type=int)
    train.add_argument("overrides", nargs="*", metavar="key=value")

    sweep = sub.add_parser(
        "sweep", help="inits x label budgets x seeds as Ray Tune trials (resumable)",
        description="Run every (init, budget, seed) of a sweep config as a Ray Tune trial. "
                    "Re-running the same command continues it; finished runs never train "
                    "again.")
    sweep.add_argument("--config", required=True, help="sweep YAML (keys: finetune/"
                       "sweep_config.py, SweepConfig)")
    sweep.add_argument("--address", help="Ray cluster to join ('auto', HOST:PORT); default: "
                       "$RAY_ADDRESS (set by ray job submit), else a local instance on "
                       "127.0.0.1")
    sweep.add_argument("--num-cpus", type=int, help="CPUs of a local instance (default: all)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")

    report = sub.add_parser(
        "report", help="the study report on a sweep or any folder of run folders",
        description="Tables, figures, paired tests and headline findings on every run under "
                    "PATH, as report.html (self-contained) and report.md.")
    report.add_argument("path", nargs="?", help="a sweep folder or a folder of run folders")
    report.add_argument("--runs", help=argparse.SUPPRESS)  # the old spelling of PATH
    report.add_argument("--out", help="output folder (default: PATH/report)")
    report.add_argument("--baseline", help="initialisation the others are compared with "
                        "(default: the sweep's baseline, else random)")
    report.add_argument("--targets", type=float, nargs="+", metavar="DICE",
                        help="test Dice targets for label efficiency (default: the sweep's "
                             "label_targets, else 0.5 0.7 0.8)")
    report.add_argument("--overlays", type=int, default=4,
                        help="test slices in the prediction grid (0: none)")

    demo = sub.add_parser("demo", help="the whole workflow on the synthetic phantom")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="DemoConfig keys, e.g. patients=12 finetune_epochs=4")
    for command in (train, sweep, report, demo):
        command.add_argument("--debug", action="store_true",
                             help="show tracebacks of input errors (or MEDSSL_DEBUG=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_input_errors(lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from finetune.config import FinetuneConfig
        from finetune.train import train_run

        flags = {k: getattr(args, k) for k in ("data", "out", "init", "arch", "budget",
                                                "seed") if getattr(args, k) is not None}
        overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items())]
        config = load_config(FinetuneConfig, args.config, overrides)
        metrics = train_run(config)
        print(json.dumps({"test": metrics["test"], "convergence": metrics["convergence"]},
                         indent=2))
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "report":
        return _report(args)
    if args.command == "demo":
        from finetune.demo import DemoConfig, run_demo

        demo = load_config(DemoConfig, None, [*args.overrides, f"out={args.out}"])
        report = run_demo(demo)
        print(report.resolve())
        return 0
    raise AssertionError(args.command)


def _sweep(args: argparse.Namespace) -> int:
    from cluster.config import apply_override, read_yaml_mapping
    from cluster.ray_local import cluster_address, prepare_local_environment
    from finetune.sweep_config import load_sweep_config

    raw = read_yaml_mapping(args.config)
    for item in args.overrides:
        apply_override(raw, item)
    config = load_sweep_config(raw)  # a bad config stops here, before Ray is imported
    if cluster_address(args.address) is None:
        prepare_local_environment()  # before anything imports Ray
    from finetune.sweep import run_sweep

    outcome = run_sweep(config, address=args.address, num_cpus=args.num_cpus)
    results = outcome.results
    print(f"sweep {config.name}: {len(results.rows)} of "
          f"{len(results.rows) + len(results.unfinished)} trials complete ({outcome.where})")
    for trial in results.unfinished:
        print(f"  not finished: {trial.key} ({trial.run_dir})", file=sys.stderr)
    print(join(config.sweep_dir, "results.csv"))
    if outcome.report is not None:
        print(outcome.report)
    return 0 if results.complete else 1


def _report(args: argparse.Namespace) -> int:
    from finetune.report import ReportSettings, publish_report

    path = args.path or args.runs
    if path is None:
        print("error: give the folder to report on (a sweep or a folder of run folders)",
              file=sys.stderr)
        return 2
    page = publish_report(path, args.out, ReportSettings(
        baseline=args.baseline, targets=args.targets, overlays=args.overlays))
    print(page)
    return 0
