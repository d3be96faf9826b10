"""``ray start`` for a further node of a cluster on this machine's loopback address.

Ray keeps a cluster on 127.0.0.1 only with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(otherwise it rewrites 127.0.0.1 to the machine's network address and talks to itself
over that), but in that mode its ``ray start`` command refuses to join a node to a
cluster, a guard meant for Windows and macOS. This runs Ray's own ``ray start`` command
with only that guard lifted; every address stays on loopback.

Usage: python tests/ray_start_loopback.py start --address 127.0.0.1:PORT [ray start flags]
"""

from __future__ import annotations

import sys
import types

import ray._private.ray_constants as ray_constants
import ray.scripts.scripts as ray_scripts

if __name__ == "__main__":
    # Only the CLI module sees the guard lifted; Ray's address handling keeps loopback.
    ray_scripts.ray_constants = types.SimpleNamespace(
        **{**vars(ray_constants), "ENABLE_RAY_CLUSTER": True})
    sys.argv = ["ray", *sys.argv[1:]]
    sys.exit(ray_scripts.main())
