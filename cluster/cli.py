"""``python -m cluster``: print launch commands for multi-node runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cluster.launch import format_command, torchrun_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    torchrun = sub.add_parser("torchrun", help="the torchrun line to run on every node")
    torchrun.add_argument("--nnodes", default="1", help="N, or MIN:MAX for elastic runs")
    torchrun.add_argument("--nproc-per-node", type=int, default=1)
    torchrun.add_argument("--rdzv-endpoint", default="127.0.0.1:29500",
                          help="HOST:PORT of the rendezvous (one of the nodes)")
    torchrun.add_argument("--run-id", default="medssl")
    torchrun.add_argument("--max-restarts", type=int, default=3)
    torchrun.add_argument("--config")
    torchrun.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.command == "torchrun":
        print(format_command(torchrun_command(
            nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
            rdzv_endpoint=args.rdzv_endpoint, run_id=args.run_id, config=args.config,
            overrides=args.overrides, max_restarts=args.max_restarts)))
    return 0
