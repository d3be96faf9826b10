"""SLURM + Ray: an sbatch script that starts a Ray cluster on the job's nodes and runs a
fine-tuning sweep on it as the job's driver.

Ray's own recipe for a batch allocation is ``ray symmetric-run``: the same command on every
node (one ``srun`` task each) starts the head on the node that owns the given address and a
worker everywhere else, runs the entrypoint on the head once all nodes have joined, and
stops Ray when it ends -- so the Ray cluster lives exactly as long as the sweep. The script
is rendered from ``cluster/templates/ray_sweep.sbatch`` (``@@{name}`` placeholders, as in
:mod:`cluster.slurm`), which also documents token authentication and why the dashboard
port stays on the head's loopback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.launch import check_overrides, format_command
from cluster.ray_cluster import DEFAULT_DASHBOARD_PORT, DEFAULT_RAY_PORT
from cluster.slurm import (
    DEFAULT_CPUS_PER_GPU,
    allocation_fields,
    check_port,
    check_positive,
    check_script_options,
    check_time,
    load_template,
)

TEMPLATE = "ray_sweep.sbatch"


@dataclass(frozen=True)
class RaySweepJob:
    """One sweep job: the allocation, Ray's ports, and the sweep's arguments."""

    nodes: int
    gpus_per_node: int
    time: str  # HH:MM:SS or D-HH:MM:SS
    config: str  # the sweep YAML
    overrides: tuple[str, ...] = ()
    job_name: str = "medssl-sweep"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # per node (one task per node); default 8 per GPU
    log: str = "%x-%j.out"
    # Whole nodes: Ray takes fixed ports and symmetric-run refuses a node where any Ray
    # (another user's too) already runs.
    exclusive: bool = True
    port: int = DEFAULT_RAY_PORT  # the head's GCS
    dashboard_port: int = DEFAULT_DASHBOARD_PORT  # dashboard + job API, head loopback only
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()  # shell lines run before Ray starts (module load, venv)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            check_positive(name, getattr(self, name))
        if self.cpus_per_task is not None:
            check_positive("cpus_per_task", self.cpus_per_task)
        check_time(self.time)
        check_port("port", self.port)
        check_port("dashboard port", self.dashboard_port)
        if self.port == self.dashboard_port:
            raise ValueError(f"port and dashboard port must differ, both are {self.port}")
        check_script_options(job_name=self.job_name, partition=self.partition,
                             account=self.account, log=self.log,
                             sbatch_options=self.sbatch_options, setup=self.setup)
        sweep_arguments(self.config, self.overrides)

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or DEFAULT_CPUS_PER_GPU * self.gpus_per_node


def sweep_arguments(config: str, overrides: Sequence[str] = ()) -> list[str]:
    """The driver: the sweep, joining the cluster this job started (``--address auto``
    finds it through the head's ``ray start``)."""
    if not config or "\n" in config:
        raise ValueError(f"sweep config {config!r} must be a path on one line")
    check_overrides(overrides)
    return ["python", "-m", "finetune", "sweep", "--address", "auto", "--config", config,
            *overrides]


def render_ray_sbatch(job: RaySweepJob) -> str:
    """The complete sbatch script for ``job``."""
    extra = ["--exclusive"] if job.exclusive else []
    return load_template(TEMPLATE).substitute(
        **allocation_fields(job, extra),
        dashboard_port=job.dashboard_port,
        driver=format_command(sweep_arguments(job.config, job.overrides)),
    )
