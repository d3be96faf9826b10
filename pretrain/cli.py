"""``python -m pretrain`` / ``torchrun ... -m pretrain``: self-supervised pretraining."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.config import ConfigError, load_config
from pretrain.config import PretrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__)
    parser.add_argument("--config", help="YAML file of PretrainConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pretrain.engine import pretrain

    result = pretrain(config)
    print(f"exported backbone to {result.export_dir}")
    return 0
