"""``python -m data_prep``: make the phantom, prepare datasets, verify them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.cli_errors import report_input_errors
from cluster.config import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    phantom = sub.add_parser("phantom", help="write synthetic cardiac patients as an ACDC tree")
    phantom.add_argument("--out", required=True, help="ACDC root to create")
    phantom.add_argument("--patients", type=int, default=20)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--image-size", type=int, default=128)
    phantom.add_argument("--noise", type=float, nargs=2, metavar=("LO", "HI"),
                         default=(0.015, 0.05),
                         help="range of the noise sigma, as a fraction of the blood signal")
    phantom.add_argument("--contrast", type=float, default=1.0,
                         help="factor on tissue contrast (below 1 is harder to segment)")

    prepare = sub.add_parser("prepare", help="raw dataset -> shards, zarr store, manifest")
    prepare.add_argument("--source", help="raw dataset root (sets source=)")
    prepare.add_argument("--out", help="prepared dataset folder (sets out=)")
    prepare.add_argument("--config", help="YAML file of PrepareConfig keys")
    prepare.add_argument("overrides", nargs="*", metavar="key=value")
    prepare.add_argument("--debug", action="store_true", help="show tracebacks")

    verify = sub.add_parser("verify", help="re-read every shard and array, check the manifest")
    verify.add_argument("folder")
    verify.add_argument("--source", help="raw dataset root: also check every source file's "
                        "sha256 against the manifest")
    verify.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_input_errors(lambda: _run(args), getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    if args.command == "phantom":
        from data_prep.phantom import PhantomConfig, write_acdc_tree

        phantom = PhantomConfig.for_image_size(args.image_size, noise=tuple(args.noise),
                                               contrast=args.contrast)
        folders = write_acdc_tree(args.out, args.patients, seed=args.seed, config=phantom,
                                  progress=True)
        print(f"wrote {len(folders)} patients under {args.out}")
        return 0
    if args.command == "prepare":
        from data_prep.prepare import PrepareConfig, prepare_dataset

        overrides = list(args.overrides)
        overrides += [f"source={args.source}"] if args.source else []
        overrides += [f"out={args.out}"] if args.out else []
        config = load_config(PrepareConfig, args.config, overrides)
        if not config.source or not config.out:
            print("error: both source and out are required", file=sys.stderr)
            return 2
        manifest = prepare_dataset(config)
        print(f"prepared {manifest.counts} in {config.out}")
        return 0
    if args.command == "verify":
        from data_prep.verify import verify_dataset

        problems = verify_dataset(args.folder, args.source)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    raise AssertionError(args.command)
