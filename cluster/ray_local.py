"""Connecting a driver to Ray: an existing cluster, or a local instance on loopback only.

A local instance (a sweep on a laptop or one workstation, ``medssl demo``) has no reason
to be reachable from, or to talk to, anything but this machine:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray on 127.0.0.1 (otherwise it swaps the
  loopback address for the machine's network address and talks to itself over that);
- the dashboard (and job API) listen on 127.0.0.1;
- the dashboard's start-up probe of cloud metadata services (169.254.169.254, made even
  with usage statistics off) is sent to a closed loopback port through an HTTP proxy
  setting that only Ray's own processes get; trial processes get the driver's
  settings back.

Call :func:`prepare_local_environment` before ``import ray`` where possible: Ray reads
the first variable when it is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cluster.environ import environment

LOOPBACK = "127.0.0.1"
_CLOSED_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once
_PROXY_KEYS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")
_NO_PROXY = "127.0.0.1,localhost,::1"
_RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else ``RAY_ADDRESS`` (set for drivers started
    by ``ray job submit``), else None for a new local instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


def prepare_local_environment() -> None:
    """Environment for a local, loopback-only instance (before ``import ray``)."""
    for key, value in _RAY_LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
            env_vars: Mapping[str, str] | None = None) -> str:
    """Join the cluster at ``address`` or start a local instance; return a description.

    ``env_vars`` reach every worker (Ray's runtime environment).
    """
    address = cluster_address(address)
    if address is None:
        prepare_local_environment()
    import ray

    worker_env = dict(env_vars or {})
    if address is not None:
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"env_vars": worker_env} if worker_env else None)
        return f"Ray cluster at {address}"
    # trial processes get the driver's proxy settings back ("" = none)
    worker_env.update({key: os.environ.get(key) or "" for key in _PROXY_KEYS})
    closed = {**{key: _CLOSED_PROXY for key in _PROXY_KEYS}, "no_proxy": _NO_PROXY,
              "NO_PROXY": _NO_PROXY}
    with environment(closed):
        context = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                           include_dashboard=True, dashboard_host=LOOPBACK,
                           _node_ip_address=LOOPBACK, log_to_driver=False,
                           runtime_env={"env_vars": worker_env})
    return f"local Ray instance (dashboard http://{context.dashboard_url})"
