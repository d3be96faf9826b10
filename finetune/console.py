"""The ``medssl`` console script: one entry point for every stage, plus ``medssl demo``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: medssl <command> [args]

commands:
  demo        the whole workflow on the built-in synthetic phantom (medssl demo --out DIR)
  sweep       inits x label budgets x seeds on Ray Tune (medssl sweep --config sweep.yaml)
  data_prep   make the phantom, prepare and verify datasets (python -m data_prep)
  pretrain    self-supervised pretraining (python -m pretrain; use torchrun for many ranks)
  finetune    fine-tuning runs and reports (python -m finetune)
  cluster     launch recipes for torchrun, SLURM and Ray (python -m cluster)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0].replace("-", "_"), args[1:]
    if command in ("demo", "sweep"):
        from finetune.cli import main as finetune_main

        return finetune_main([command, *rest])
    if command == "data_prep":
        from data_prep.cli import main as run
    elif command == "pretrain":
        from pretrain.cli import main as run
    elif command == "finetune":
        from finetune.cli import main as run
    elif command == "cluster":
        from cluster.cli import main as run
    else:
        print(f"medssl: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":  # python -m finetune.console, as the medssl script
    sys.exit(main())
