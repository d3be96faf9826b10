"""An on-premise Ray cluster: the cluster-launcher YAML that ``ray up`` turns into a Ray
cluster on machines you already have (``provider: type: local``), for fine-tuning sweeps.

The launcher logs in to every node over SSH, runs the set-up commands and starts Ray: the
head with ``ray start --head``, each worker with ``ray start --address=$RAY_HEAD_IP:PORT``
(the launcher fills in ``RAY_HEAD_IP``). Two things are not Ray's defaults here:

- token authentication: every node gets the token file (``file_mounts``) and starts Ray
  with ``RAY_AUTH_MODE=token``, so that nobody without the token can use the cluster's
  ports, which the nodes must reach on each other's network addresses;
- the dashboard, which is also the job API (``ray job submit`` runs whatever it is sent),
  listens on the head's 127.0.0.1 only; reach it through ``ray dashboard`` (SSH).

:func:`check_cluster_config` runs the config through Ray's own schema and the preparation
``ray up`` applies before it contacts any host, so a bad config fails here, offline.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cluster.slurm import NAME, check_port, check_positive, check_word

DEFAULT_RAY_PORT = 6379  # Ray's GCS port (ray._private.ray_constants.DEFAULT_PORT)
DEFAULT_DASHBOARD_PORT = 8265  # dashboard and job API (ray_constants.DEFAULT_DASHBOARD_PORT)
DASHBOARD_HOST = "127.0.0.1"  # loopback: the job API runs any code it is sent
# Where Ray looks for the token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set,
# and where `ray get-auth-token --generate` writes it.
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
# The file `ray up` writes on the head for its autoscaler (the launcher's own convention).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"

_SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")

HEADER = """\
# medssl: a Ray cluster on machines you already have, for fine-tuning sweeps.
# Rendered by `python -m cluster ray-cluster`. From the machine that holds the SSH key:
#   ray get-auth-token --generate; chmod 600 {token_file}   # once: the cluster's token
#   ray up THIS_FILE        # SSH to every node, run the set-up, start Ray
#   ray dashboard THIS_FILE # forward the head's 127.0.0.1:{dashboard_port} here (keep it open)
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:{dashboard_port} \\
#       --working-dir . -- python -m finetune sweep --config sweep.yaml
#   ray down THIS_FILE
# Token authentication (RAY_AUTH_MODE=token): every Ray process and client must present
# the token. Ray reads it from $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
# ~/.ray/auth_token; file_mounts copies your {token_file} to ~/.ray/auth_token on every
# node. Without a token, anyone who can reach the nodes' Ray ports (GCS {port}, raylet,
# object manager, workers: they listen on the nodes' network addresses) can run code as
# {ssh_user}.
# The dashboard port {dashboard_port} is also the job API, which runs any code it is sent:
# it listens on the head's 127.0.0.1 only and must not be reachable by others -- keep it
# that way (no --dashboard-host=0.0.0.0); loopback is shared by everyone logged in on the
# head, which the token guards against.
"""


@dataclass(frozen=True)
class RayClusterSpec:
    """The machines, how to log in to them, and how to start Ray on them."""

    head_ip: str
    worker_ips: tuple[str, ...]
    ssh_user: str
    ssh_private_key: str | None = None  # default: the launcher's (ssh-agent / ~/.ssh)
    cluster_name: str = "medssl"
    num_cpus: int | None = None  # per node; default: what Ray detects
    num_gpus: int | None = None  # per node; default: what Ray detects
    port: int = DEFAULT_RAY_PORT
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    # A shell line that puts `ray` on PATH (venv, conda, module load). The launcher runs
    # every command in a fresh login shell, so it prefixes each Ray command.
    activate: str | None = None
    setup: tuple[str, ...] = ()  # setup_commands: run on every node before Ray starts
    file_mounts: tuple[tuple[str, str], ...] = ()  # (remote path, local path)
    token_file: str = DEFAULT_TOKEN_FILE  # local file, copied to ~/.ray/auth_token

    def __post_init__(self) -> None:
        hosts = [_check_host("head IP", self.head_ip)]
        hosts += [_check_host("worker IP", host) for host in self.worker_ips]
        if len(set(hosts)) != len(hosts):
            raise ValueError("head and worker IPs must all differ, got "
                             + ", ".join([self.head_ip, *self.worker_ips]))
        check_word("ssh user", self.ssh_user, _SSH_USER)
        check_word("cluster name", self.cluster_name, NAME)
        if self.num_cpus is not None:
            check_positive("num_cpus", self.num_cpus)
        if self.num_gpus is not None and (isinstance(self.num_gpus, bool)
                                          or not isinstance(self.num_gpus, int)
                                          or self.num_gpus < 0):
            raise ValueError(f"num_gpus must be an integer >= 0, got {self.num_gpus!r}")
        check_port("port", self.port)
        check_port("dashboard port", self.dashboard_port)
        if self.port == self.dashboard_port:
            raise ValueError(f"port and dashboard port must differ, both are {self.port}")
        for what, value in (("ssh private key", self.ssh_private_key),
                            ("activate command", self.activate),
                            ("token file", self.token_file)):
            if value is not None:
                _check_line(what, value)
        for line in self.setup:
            _check_line("set-up command", line)
        for remote, local in self.file_mounts:
            _check_line("file mount", f"{remote}={local}")
            if not remote or not local:
                raise ValueError(f"file mount {remote}={local!r} needs REMOTE=LOCAL paths")


def parse_file_mount(text: str) -> tuple[str, str]:
    """``REMOTE=LOCAL`` (as the launcher's ``file_mounts`` maps remote to local paths)."""
    remote, sep, local = text.partition("=")
    if not sep or not remote.strip() or not local.strip():
        raise ValueError(f"file mount {text!r} must look like REMOTE_PATH=LOCAL_PATH")
    return remote.strip(), local.strip()


def start_commands(spec: RayClusterSpec) -> tuple[list[str], list[str]]:
    """(head, worker) start commands. ``ray stop`` first: ``ray up`` on a running cluster
    restarts Ray rather than failing on a busy port."""
    resources = []
    if spec.num_cpus is not None:
        resources.append(f"--num-cpus={spec.num_cpus}")
    if spec.num_gpus is not None:
        resources.append(f"--num-gpus={spec.num_gpus}")
    head = ["ray", "start", "--head", f"--port={spec.port}",
            f"--dashboard-host={DASHBOARD_HOST}", f"--autoscaling-config={BOOTSTRAP_CONFIG}",
            f"--dashboard-port={spec.dashboard_port}", *resources]
    worker = ["ray", "start", f"--address=$RAY_HEAD_IP:{spec.port}", *resources]
    prefix = f"{spec.activate} && " if spec.activate else ""
    # unquoted on purpose: `~` and $RAY_HEAD_IP are for the node's shell to expand
    stop = f"{prefix}ray stop"
    auth = "RAY_AUTH_MODE=token "
    return ([stop, prefix + auth + " ".join(head)], [stop, prefix + auth + " ".join(worker)])


def cluster_config(spec: RayClusterSpec) -> dict[str, Any]:
    """The launcher config as a dict, keys in the order a reader wants them."""
    auth: dict[str, str] = {"ssh_user": spec.ssh_user}
    if spec.ssh_private_key:
        auth["ssh_private_key"] = spec.ssh_private_key
    head, worker = start_commands(spec)
    return {
        "cluster_name": spec.cluster_name,
        "provider": {"type": "local", "head_ip": spec.head_ip,
                     "worker_ips": list(spec.worker_ips)},
        "auth": auth,
        # every listed worker stays in the cluster: the machines are there anyway
        "max_workers": len(spec.worker_ips),
        "file_mounts": {DEFAULT_TOKEN_FILE: spec.token_file, **dict(spec.file_mounts)},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": list(spec.setup),
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": head,
        "worker_start_ray_commands": worker,
    }


def render_cluster_yaml(spec: RayClusterSpec) -> str:
    """The commented YAML file for ``ray up``."""
    import yaml

    header = HEADER.format(token_file=spec.token_file, dashboard_port=spec.dashboard_port,
                           port=spec.port, ssh_user=spec.ssh_user)
    # a wide line: start commands stay one line each, as a reader greps for them
    return header + yaml.safe_dump(cluster_config(spec), sort_keys=False, width=4096)


def check_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check ``config`` the way ``ray up`` does before it contacts any host: Ray's JSON
    schema, then the local provider's preparation (node type, worker counts, defaults) and
    the schema again on the result. Returns the prepared config; raises ValueError.

    Nothing here opens a connection or touches a node; the provider class is only used
    for its static methods, never instantiated (that would take a lock file).
    """
    import click
    import jsonschema
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(config)
        prepared = prepare_config(config)
        provider = _get_node_provider_cls(prepared["provider"])
        prepared = provider.fillout_available_node_types_resources(prepared)
        validate_config(prepared)
        return provider.bootstrap_config(prepared)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise ValueError(f"Ray's cluster schema rejects {where}: {exc.message}") from None
    except (click.ClickException, RuntimeError, KeyError, TypeError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else exc
        raise ValueError(f"Ray's cluster launcher rejects the config: {message}") from None


def _check_host(what: str, value: str) -> str:
    """An IP address, or a host name the local provider resolves (gethostbyname) to one;
    returned in a canonical form, to catch the same node listed twice."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    numeric = value.replace(".", "").isdigit()  # a mistyped IP, not a name
    if not NAME.fullmatch(value) or value.endswith((".", "-")) or numeric:
        raise ValueError(f"{what} {value!r} must be an IP address or a host name")
    return value.lower()


def _check_line(what: str, value: str) -> None:
    if not value or "\n" in value or "\r" in value:
        raise ValueError(f"{what} {value!r} must be one non-empty line")

