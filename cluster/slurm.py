"""SLURM: an sbatch script that runs multi-node pretraining with one torchrun agent per node.

The script is rendered from ``cluster/templates/pretrain.sbatch``, where the whole recipe
-- directives, environment defaults, head-node discovery and the ``srun torchrun`` line --
can be read in one place. Placeholders there are ``@@{name}``, so bash's own ``$VAR`` and
``${VAR:-default}`` stay exactly as written. Every value is validated before rendering,
and the program's arguments (config path, ``key=value`` overrides) are shell-quoted.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cluster.launch import (
    DEFAULT_RDZV_PORT,
    check_monitor_interval,
    format_command,
    pretrain_arguments,
)

TEMPLATE = "pretrain.sbatch"
DEFAULT_CPUS_PER_GPU = 8

# Names SLURM takes (job, account, partition list): nothing a shell or sbatch could split.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_LIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*")
_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d)")


class ScriptTemplate(string.Template):
    """``@@{name}`` placeholders, so that a bash script keeps its ``$`` untouched."""

    delimiter = "@@"


@dataclass(frozen=True)
class SlurmJob:
    """One pretraining job: the allocation, the launch, and the program's arguments."""

    nodes: int
    gpus_per_node: int
    time: str  # HH:MM:SS or D-HH:MM:SS
    job_name: str = "medssl-pretrain"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # per node (one task per node); default 8 per GPU
    log: str = "%x-%j.out"  # SLURM's --output: %x job name, %j job id; the folder must exist
    requeue: bool = False  # let SLURM requeue the job (preemption, node failure); it resumes
    port: int = DEFAULT_RDZV_PORT
    max_restarts: int = 3
    monitor_interval: float | None = None
    sbatch_options: tuple[str, ...] = ()  # extra directives, e.g. "--constraint=h100"
    setup: tuple[str, ...] = ()  # shell lines run before launching (module load, venv)
    config: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            check_positive(name, getattr(self, name))
        if self.cpus_per_task is not None:
            check_positive("cpus_per_task", self.cpus_per_task)
        if isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        check_port("port", self.port)
        check_monitor_interval(self.monitor_interval)
        check_time(self.time)
        check_script_options(job_name=self.job_name, partition=self.partition,
                             account=self.account, log=self.log,
                             sbatch_options=self.sbatch_options, setup=self.setup)
        pretrain_arguments(self.config, self.overrides)  # checks the overrides

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or DEFAULT_CPUS_PER_GPU * self.gpus_per_node


def check_time(time: str) -> None:
    """SLURM wall time as ``HH:MM:SS`` or ``D-HH:MM:SS``; more than zero."""
    match = _TIME.fullmatch(time)
    if not match:
        raise ValueError(f"time {time!r} must look like HH:MM:SS or D-HH:MM:SS")
    days, hours = int(match["days"] or 0), int(match["hours"])
    minutes, seconds = int(match["minutes"]), int(match["seconds"])
    if minutes > 59 or seconds > 59 or (match["days"] is not None and hours > 23):
        raise ValueError(f"time {time!r}: minutes and seconds must be < 60, hours < 24 "
                         "after a day count")
    if days == hours == minutes == seconds == 0:
        raise ValueError(f"time {time!r} must be longer than zero")


def check_script_options(*, job_name: str, partition: str | None, account: str | None,
                         log: str, sbatch_options: Sequence[str], setup: Sequence[str]) -> None:
    """The options every rendered sbatch script shares. Each value lands on a line of its
    own in the script, so none may hold a newline (or, for names, anything sbatch or the
    shell would split or expand)."""
    check_word("job name", job_name, NAME)
    if partition is not None:
        check_word("partition (comma-separated list)", partition, NAME_LIST)
    if account is not None:
        check_word("account", account, NAME)
    if not log or any(ch.isspace() for ch in log):
        raise ValueError(f"log path {log!r} must be non-empty and without spaces")
    for option in sbatch_options:
        if not option.startswith("--") or "\n" in option:
            raise ValueError(f"sbatch option {option!r} must look like --name=value")
    for line in setup:
        if "\n" in line:
            raise ValueError(f"set-up command {line!r} must be one line (repeat --setup)")


def optional_directives(partition: str | None, account: str | None,
                        extra: Sequence[str] = ()) -> str:
    """``#SBATCH`` lines for the options that are only there when given."""
    directives = [f"--partition={partition}"] if partition else []
    if account:
        directives.append(f"--account={account}")
    return "\n".join(f"#SBATCH {option}" for option in [*directives, *extra])


def load_template(name: str) -> ScriptTemplate:
    """A script template shipped in ``cluster/templates`` (package data)."""
    return ScriptTemplate(
        resources.files("cluster").joinpath("templates", name).read_text("utf-8"))


def allocation_fields(job: Any, extra_directives: list[str]) -> dict[str, Any]:
    """Template fields every sbatch script of ours shares: the allocation, the optional
    directives, the set-up lines and the head node's port (``job``: a job dataclass)."""
    return {
        "nodes": job.nodes, "gpus_per_node": job.gpus_per_node, "cpus_per_task": job.cpus,
        "time": job.time, "job_name": job.job_name, "log": job.log,
        "optional_directives": optional_directives(
            job.partition, job.account, [*extra_directives, *job.sbatch_options]),
        "setup": "\n".join(job.setup) or "# (none)", "port": job.port,
    }


def render_sbatch(job: SlurmJob) -> str:
    """The complete sbatch script for ``job``."""
    extra = ["--requeue"] if job.requeue else []
    torchrun_options = ""
    if job.monitor_interval is not None:
        torchrun_options = f" --monitor-interval={job.monitor_interval:g}"
    return load_template(TEMPLATE).substitute(
        **allocation_fields(job, extra),
        max_restarts=job.max_restarts,
        torchrun_options=torchrun_options,
        program=format_command(pretrain_arguments(job.config, job.overrides)),
    )


def check_positive(name: str, value: int) -> None:
    """A count of at least one (bool is not a count, though Python says it is an int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_port(name: str, port: int) -> None:
    """A TCP port a server can be told to listen on (0, "any free port", is not one: the
    other nodes need to know it in advance)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{name} must be 1..65535, got {port!r}")


def check_word(what: str, value: str, pattern: re.Pattern[str]) -> None:
    """``value`` matches ``pattern`` entirely (names that go unquoted into a script)."""
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '.', '_' and '-'")
