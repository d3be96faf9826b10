"""``python -m pretrain`` / ``torchrun ... -m pretrain``: self-supervised pretraining.

``python -m pretrain export --run RUN_DIR`` exports a run's backbone from a checkpoint
(``RUN_DIR`` may be an ``s3://`` URL: the export is written there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.cli_errors import report_input_errors
from cluster.config import load_config
from pretrain.config import PretrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["export"]:  # overrides always hold "=", so no clash with a config key
        return export_main(args[1:])
    parser = argparse.ArgumentParser(
        prog="python -m pretrain", description=__doc__,
        epilog="Export a backbone on demand: python -m pretrain export --help")
    parser.add_argument("--config", help="YAML file of PretrainConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parsed = parser.parse_args(args)
    return report_input_errors(lambda: _pretrain(parsed), parsed.debug)


def _pretrain(parsed: argparse.Namespace) -> int:
    config = load_config(PretrainConfig, parsed.config, parsed.overrides)
    from pretrain.engine import pretrain

    result = pretrain(config)
    print(f"exported backbone to {result.export_dir}")
    return 0


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain export",
        description="Write a run's backbone (timm-named safetensors + JSON) from its latest "
                    "or a kept checkpoint, e.g. while it still runs or for an early epoch.")
    # str, not Path: a URL's "//" must survive
    parser.add_argument("--run", required=True, help="pretrain run directory or s3:// URL")
    parser.add_argument("--checkpoint", default="last.pt",
                        help="a name in RUN/checkpoints (last.pt, epoch0003.pt), a path "
                             "or a URL")
    parser.add_argument("--out", help="output folder or s3:// URL (default: RUN/export for "
                                      "last.pt, else RUN/export-NAME)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    return report_input_errors(lambda: _export(args), args.debug)


def _export(args: argparse.Namespace) -> int:
    from pretrain.export import export_checkpoint

    folder = export_checkpoint(args.run, args.checkpoint, args.out)
    print(f"exported backbone to {folder}")
    return 0
