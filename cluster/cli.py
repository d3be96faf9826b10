"""``python -m cluster``: launch recipes for multi-node runs (torchrun, SLURM, Ray, DeepSpeed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from cluster.cli_errors import report_input_errors
from cluster.launch import (
    DEFAULT_RDZV_PORT,
    TORCHRUN_ENV,
    format_command,
    parse_endpoint,
    parse_nnodes,
    torchrun_command,
)

TORCHRUN_EXAMPLES = """\
examples:
  # one node, 8 GPUs (run it on that node)
  python -m cluster torchrun --nproc-per-node 8 --config cfg.yaml

  # two nodes x 8 GPUs: run the printed line on both; node0 serves the rendezvous
  python -m cluster torchrun --nnodes 2 --nproc-per-node 8 \\
      --rdzv-endpoint node0.example:29400 --run-id byol-acdc --config cfg.yaml

  # elastic: start with 2 to 4 nodes, continue when nodes join or leave
  python -m cluster torchrun --nnodes 2:4 --nproc-per-node 8 \\
      --rdzv-endpoint node0.example:29400 --config cfg.yaml

note: torch's rendezvous store listens on every network interface of the endpoint's
host, even when the endpoint is 127.0.0.1; on shared machines keep its port firewalled.
"""

SLURM_EXAMPLES = """\
example:
  python -m cluster slurm --nodes 4 --gpus-per-node 8 --time 12:00:00 \\
      --partition gpu --account proj42 --setup 'source .venv/bin/activate' \\
      --config cfg.yaml --out pretrain.sbatch run.out=runs/byol-acdc
  sbatch pretrain.sbatch
"""

RAY_SLURM_EXAMPLES = """\
example:
  python -m cluster ray-slurm --nodes 2 --gpus-per-node 8 --time 12:00:00 \\
      --partition gpu --account proj42 --setup 'source .venv/bin/activate' \\
      --config sweep.yaml --out sweep.sbatch out=runs/sweep-acdc
  sbatch sweep.sbatch

The job starts Ray on its nodes (ray symmetric-run), runs
`python -m finetune sweep --address auto --config sweep.yaml ...` on the first node and
stops Ray when the sweep ends. Token authentication is on; the script says how it works.
"""

RAY_CLUSTER_EXAMPLES = """\
example:
  python -m cluster ray-cluster --head-ip 10.0.0.1 --worker-ip 10.0.0.2 \\
      --worker-ip 10.0.0.3 --ssh-user alice --ssh-private-key ~/.ssh/id_ed25519 \\
      --num-gpus 8 --activate 'source /shared/medssl/.venv/bin/activate' \\
      --check --out cluster.yaml
  ray get-auth-token --generate; chmod 600 ~/.ray/auth_token
  ray up cluster.yaml
  ray dashboard cluster.yaml     # in another terminal: the job API on 127.0.0.1:8265
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
      -- python -m finetune sweep --config sweep.yaml
"""

DEEPSPEED_EXAMPLES = """\
examples:
  python -m cluster deepspeed-config --stage 2 --micro-batch 32
  python -m cluster deepspeed-config --stage 1 --global-batch 1024 --world-size 16 \\
      --grad-accum 2 --gradient-clipping 1.0 --out ds_zero1.json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    torchrun = sub.add_parser(
        "torchrun", help="the torchrun line to run on every node", epilog=TORCHRUN_EXAMPLES,
        formatter_class=raw,
        description="Print the torchrun command (c10d rendezvous) to run on every node.")
    torchrun.add_argument("--nnodes", default="1", help="N, or MIN:MAX for elastic runs")
    torchrun.add_argument("--nproc-per-node", type=int, default=1,
                          help="processes per node, one per GPU")
    torchrun.add_argument("--rdzv-endpoint", default="127.0.0.1:29500",
                          help="HOST:PORT of the rendezvous (one of the nodes)")
    torchrun.add_argument("--run-id", default="medssl",
                          help="rendezvous id; a new one per job on a shared endpoint")
    torchrun.add_argument("--max-restarts", type=int, default=3,
                          help="worker-group restarts before giving up (they resume)")
    torchrun.add_argument("--monitor-interval", type=float,
                          help="seconds between the agent's checks of its workers")
    torchrun.add_argument("--local-addr",
                          help="this node's address for the other nodes (default: its FQDN)")
    _add_program_arguments(torchrun)
    torchrun.add_argument("--debug", action="store_true", help="show tracebacks of input errors")

    slurm = sub.add_parser(
        "slurm", help="an sbatch script for multi-node pretraining", epilog=SLURM_EXAMPLES,
        formatter_class=raw,
        description="Print (or --out: write) an sbatch script running one torchrun agent "
                    "per node with a c10d rendezvous on the first node.")
    _add_allocation_arguments(slurm, "medssl-pretrain", "CPU cores per node")
    slurm.add_argument("--requeue", action="store_true",
                       help="allow SLURM to requeue the job; it resumes from its checkpoint")
    slurm.add_argument("--port", type=int, default=DEFAULT_RDZV_PORT,
                       help="rendezvous port on the first node")
    slurm.add_argument("--max-restarts", type=int, default=3)
    slurm.add_argument("--monitor-interval", type=float)
    slurm.add_argument("--setup", action="append", default=[], metavar="CMD",
                       help="shell line to run before launching (repeatable)")
    slurm.add_argument("--out", help="write the script here instead of printing it")
    _add_program_arguments(slurm)
    slurm.add_argument("--debug", action="store_true", help="show tracebacks of input errors")

    _add_ray_slurm(sub)
    _add_ray_cluster(sub)

    ds = sub.add_parser(
        "deepspeed-config", help="a DeepSpeed ZeRO config for pretraining",
        epilog=DEEPSPEED_EXAMPLES, formatter_class=raw,
        description="Print (or --out: write) a DeepSpeed config (JSON) for ZeRO stage 0-2.")
    ds.add_argument("--stage", type=int, required=True, choices=(0, 1, 2))
    batch = ds.add_mutually_exclusive_group(required=True)
    batch.add_argument("--micro-batch", type=int, help="per-GPU batch of one step")
    batch.add_argument("--global-batch", type=int,
                       help="medssl's data.batch_size; needs --world-size")
    ds.add_argument("--world-size", type=int, help="total GPU processes (with --global-batch)")
    ds.add_argument("--grad-accum", type=int, default=1)
    ds.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="fp32 compute (default: bf16 autocast, for CUDA)")
    ds.add_argument("--gradient-clipping", type=float, help="max global gradient norm")
    ds.add_argument("--check", action="store_true",
                    help="also parse the config with the installed DeepSpeed")
    ds.add_argument("--out", help="write the JSON here instead of printing it")
    ds.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return parser


def _add_allocation_arguments(parser: argparse.ArgumentParser, job_name: str,
                              cpus_help: str) -> None:
    """The SLURM allocation flags every sbatch generator takes."""
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--time", required=True, help="wall time, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default=job_name)
    parser.add_argument("--cpus-per-task", type=int, help=f"{cpus_help} (default: 8 per GPU)")
    parser.add_argument("--log", default="%x-%j.out",
                        help="SLURM log file (%%x job name, %%j job id); its folder must exist")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        dest="sbatch_options",
                        help="extra #SBATCH directive, e.g. --sbatch=--constraint=h100")


def _add_ray_slurm(sub: argparse._SubParsersAction) -> None:
    from cluster.ray_cluster import DEFAULT_DASHBOARD_PORT, DEFAULT_RAY_PORT

    parser = sub.add_parser(
        "ray-slurm", help="an sbatch script running a fine-tuning sweep on a Ray cluster",
        epilog=RAY_SLURM_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print (or --out: write) an sbatch script that starts Ray on every node "
                    "of the allocation (head on the first) and runs the sweep as the driver.")
    _add_allocation_arguments(parser, "medssl-sweep", "CPU cores per node, Ray's --num-cpus")
    parser.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                        help="share nodes with other jobs (no other Ray may run on them)")
    parser.add_argument("--port", type=int, default=DEFAULT_RAY_PORT,
                        help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="dashboard and job API, on the head's 127.0.0.1")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="shell line to run before Ray starts (repeatable); must put "
                             "ray and python on PATH")
    parser.add_argument("--out", help="write the script here instead of printing it")
    parser.add_argument("--config", required=True, help="sweep YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")


def _add_ray_cluster(sub: argparse._SubParsersAction) -> None:
    from cluster.ray_cluster import DEFAULT_DASHBOARD_PORT, DEFAULT_RAY_PORT, DEFAULT_TOKEN_FILE

    parser = sub.add_parser(
        "ray-cluster", help="a Ray cluster-launcher YAML for machines you already have",
        epilog=RAY_CLUSTER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print (or --out: write) the YAML for `ray up` on an on-premise cluster "
                    "(provider type local), with token authentication and the dashboard on "
                    "the head's loopback.")
    parser.add_argument("--head-ip", required=True, help="the head node (IP or host name)")
    parser.add_argument("--worker-ip", action="append", default=[], dest="worker_ips",
                        metavar="IP", help="a worker node (repeatable)")
    parser.add_argument("--ssh-user", required=True)
    parser.add_argument("--ssh-private-key", help="default: ssh-agent / ~/.ssh")
    parser.add_argument("--cluster-name", default="medssl")
    parser.add_argument("--num-cpus", type=int, help="Ray's CPUs per node (default: detected)")
    parser.add_argument("--num-gpus", type=int, help="Ray's GPUs per node (default: detected)")
    parser.add_argument("--port", type=int, default=DEFAULT_RAY_PORT,
                        help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="dashboard and job API, on the head's 127.0.0.1")
    parser.add_argument("--activate", metavar="CMD",
                        help="shell line putting ray on PATH, prefixed to every Ray command "
                             "(each runs in a fresh shell)")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="set-up command run on every node (repeatable, each in a fresh "
                             "shell)")
    parser.add_argument("--file-mount", action="append", default=[], metavar="REMOTE=LOCAL",
                        dest="file_mounts", help="copy a local path to every node (repeatable)")
    parser.add_argument("--auth-token-file", default=DEFAULT_TOKEN_FILE,
                        help="local token file copied to ~/.ray/auth_token on every node")
    parser.add_argument("--check", action="store_true",
                        help="also check the config with Ray's schema and the launcher's "
                             "preparation (offline)")
    parser.add_argument("--out", help="write the YAML here instead of printing it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")


def _add_program_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pretraining YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return report_input_errors(lambda: _write(args), args.debug)


def _write(args: argparse.Namespace) -> int:
    text = _run(args)
    if getattr(args, "out", None):
        from cluster.atomic import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _run(args: argparse.Namespace) -> str:
    if args.command == "torchrun":
        host, _ = parse_endpoint(args.rdzv_endpoint)
        if parse_nnodes(args.nnodes)[1] > 1 and host in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: other nodes cannot reach the rendezvous at {host}; pass "
                  "--rdzv-endpoint HOST:PORT of one of the nodes", file=sys.stderr)
        return format_command(torchrun_command(
            nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
            rdzv_endpoint=args.rdzv_endpoint, run_id=args.run_id, config=args.config,
            overrides=args.overrides, max_restarts=args.max_restarts,
            monitor_interval=args.monitor_interval, local_addr=args.local_addr),
            env=TORCHRUN_ENV) + "\n"
    if args.command == "slurm":
        from cluster.slurm import SlurmJob, render_sbatch

        return render_sbatch(SlurmJob(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
            job_name=args.job_name, partition=args.partition, account=args.account,
            cpus_per_task=args.cpus_per_task, log=args.log, requeue=args.requeue,
            port=args.port, max_restarts=args.max_restarts,
            monitor_interval=args.monitor_interval,
            sbatch_options=tuple(args.sbatch_options), setup=tuple(args.setup),
            config=args.config, overrides=tuple(args.overrides)))
    if args.command == "ray-slurm":
        from cluster.ray_slurm import RaySweepJob, render_ray_sbatch

        return render_ray_sbatch(RaySweepJob(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
            config=args.config, overrides=tuple(args.overrides), job_name=args.job_name,
            partition=args.partition, account=args.account,
            cpus_per_task=args.cpus_per_task, log=args.log, exclusive=args.exclusive,
            port=args.port, dashboard_port=args.dashboard_port,
            sbatch_options=tuple(args.sbatch_options), setup=tuple(args.setup)))
    if args.command == "ray-cluster":
        return _ray_cluster_yaml(args)
    from cluster.deepspeed_presets import (
        check_deepspeed_config,
        deepspeed_config,
        micro_batch_size,
    )

    micro_batch = args.micro_batch
    if micro_batch is not None and args.world_size is not None:
        raise ValueError("--world-size goes with --global-batch, not --micro-batch")
    if micro_batch is None:
        if args.world_size is None:
            raise ValueError("--global-batch needs --world-size")
        micro_batch = micro_batch_size(args.global_batch, args.world_size, args.grad_accum)
    config = deepspeed_config(args.stage, micro_batch, args.grad_accum, args.bf16,
                              gradient_clipping=args.gradient_clipping)
    if args.check:
        check_deepspeed_config(config)
    return json.dumps(config, indent=2) + "\n"


def _ray_cluster_yaml(args: argparse.Namespace) -> str:
    import yaml

    from cluster.ray_cluster import (
        RayClusterSpec,
        check_cluster_config,
        parse_file_mount,
        render_cluster_yaml,
    )

    spec = RayClusterSpec(
        head_ip=args.head_ip, worker_ips=tuple(args.worker_ips), ssh_user=args.ssh_user,
        ssh_private_key=args.ssh_private_key, cluster_name=args.cluster_name,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, port=args.port,
        dashboard_port=args.dashboard_port, activate=args.activate, setup=tuple(args.setup),
        file_mounts=tuple(parse_file_mount(item) for item in args.file_mounts),
        token_file=args.auth_token_file)
    text = render_cluster_yaml(spec)
    if args.check:
        check_cluster_config(yaml.safe_load(text))
    if not os.path.isfile(os.path.expanduser(spec.token_file)):
        print(f"warning: {spec.token_file} does not exist yet; `ray up` copies it to every "
              "node: create it with `ray get-auth-token --generate`", file=sys.stderr)
    return text
