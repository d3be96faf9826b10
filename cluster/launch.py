"""Launch recipes: the torchrun command line for N nodes x G processes per node.

torchrun runs one *agent* per node. The agents meet at a c10d rendezvous -- a TCPStore
served by the agent on the endpoint's host -- agree on the world, and each starts G worker
processes running ``-m pretrain``. The same command runs unchanged on every node, which is
what makes it easy to wrap (``srun`` in :mod:`cluster.slurm`, a job scheduler, a shell loop).

Everything here builds argument lists; nothing is executed. Values are validated when the
command is built, so a typo fails on the submit host rather than hours later in a queue.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

DEFAULT_RDZV_PORT = 29400  # torchrun's own default port for the c10d rendezvous

_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_nnodes(nnodes: str | int) -> tuple[int, int]:
    """``"N"`` -> ``(N, N)``; elastic ``"MIN:MAX"`` -> ``(MIN, MAX)``, with 1 <= MIN <= MAX."""
    text = str(nnodes).strip()
    parts = text.split(":")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"nnodes {nnodes!r} must be a node count N or an elastic range MIN:MAX")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1:
        raise ValueError(f"nnodes {nnodes!r}: the node count must be at least 1")
    if high < low:
        raise ValueError(f"nnodes {nnodes!r}: MIN ({low}) is larger than MAX ({high})")
    return low, high


def parse_endpoint(endpoint: str) -> tuple[str, int | None]:
    """Split ``HOST[:PORT]`` (``[IPv6]:PORT`` too) and check the port is a valid TCP port."""
    text = endpoint.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f"rendezvous endpoint {endpoint!r} must look like [IPV6]:PORT")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"rendezvous endpoint {endpoint!r} must look like HOST:PORT")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"rendezvous endpoint {endpoint!r}: port must be 1..65535")
    return host, int(port_text)


def check_overrides(overrides: Sequence[str]) -> None:
    """Each override must look like ``key.sub=value`` (the value is checked by the program)."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not _OVERRIDE_KEY.fullmatch(key.strip()):
            raise ValueError(f"override {item!r} must look like key.sub=value")


def pretrain_arguments(config: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """What follows the launcher's own options: ``-m pretrain [--config FILE] overrides``."""
    check_overrides(overrides)
    arguments = ["-m", "pretrain"]
    if config:
        arguments += ["--config", config]
    return arguments + list(overrides)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_monitor_interval(monitor_interval: float | None) -> None:
    if monitor_interval is not None and not monitor_interval > 0:
        raise ValueError(f"monitor interval must be > 0 seconds, got {monitor_interval!r}")


# Environment for every torchrun agent: workers get a fresh process-group store at each
# (re)start instead of the agents' long-lived one, whose stale keys hang a restarted group
# (see cluster.distributed); it also lets a node join a running elastic job.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(*, nnodes: str | int, nproc_per_node: int, rdzv_endpoint: str,
                     run_id: str, config: str | None, overrides: Sequence[str] = (),
                     max_restarts: int = 3, monitor_interval: float | None = None,
                     local_addr: str | None = None,
                     rdzv_conf: Mapping[str, object] | None = None) -> list[str]:
    """A torchrun invocation with a c10d rendezvous, to run identically on every node.

    ``nnodes`` may be ``"N"`` or an elastic ``"MIN:MAX"``; ``max_restarts`` lets torchrun
    restart failed workers, which then resume from the latest checkpoint;
    ``monitor_interval`` is how often (seconds) the agent polls its workers (torchrun's
    default when None). ``local_addr`` is the address other nodes and this node's workers
    use to reach this agent (the machine's FQDN when None). ``rdzv_conf`` passes c10d
    options such as ``join_timeout`` (seconds to wait for all nodes) or ``is_host``
    (whether this agent serves the rendezvous store, instead of guessing from the host name).
    """
    parse_nnodes(nnodes)
    _check_count("nproc_per_node", nproc_per_node, 1)
    _check_count("max_restarts", max_restarts, 0)
    check_monitor_interval(monitor_interval)
    parse_endpoint(rdzv_endpoint)
    if not run_id or any(ch.isspace() for ch in run_id):
        raise ValueError(f"run id {run_id!r} must be a non-empty word")
    command = [
        "torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}",
        f"--max-restarts={max_restarts}",
    ]
    if monitor_interval is not None:
        command.append(f"--monitor-interval={monitor_interval:g}")
    if local_addr:
        command.append(f"--local-addr={local_addr}")
    if rdzv_conf:
        command.append(f"--rdzv-conf={format_rdzv_conf(rdzv_conf)}")
    return command + pretrain_arguments(config, overrides)


def format_rdzv_conf(rdzv_conf: Mapping[str, object]) -> str:
    """``{"join_timeout": 60, "is_host": True}`` -> ``join_timeout=60,is_host=1``."""
    items = []
    for key, value in rdzv_conf.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if not key or any(ch in f"{key}{text}" for ch in ",= \n"):
            raise ValueError(f"rendezvous option {key}={text!r} must not contain ',', '=' "
                             "or spaces")
        items.append(f"{key}={text}")
    return ",".join(items)


def format_command(command: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """One shell line (``VAR=value ... command``); every part quoted so that the shell
    passes it through unchanged."""
    assignments = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    return " ".join(assignments + [shlex.quote(part) for part in command])
