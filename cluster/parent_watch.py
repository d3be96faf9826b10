"""A process that must not outlive the one that started it: a Ray job's driver.

``ray job submit`` runs its entrypoint in a shell under the job's supervisor. When that
shell or the supervisor is killed, the driver below it is re-parented and runs on as an
orphan, still steering trials, while the job counts as failed and may be submitted
again. Watching for the change of parent stops it within a second.
"""

from __future__ import annotations

import os
import sys
import threading
import time

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a submitted job's entrypoint


def under_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def exit_with_parent(what: str, every: float = 1.0) -> bool:
    """Exit this process (status 1) as soon as its parent is gone. Returns whether a
    watch started (not for a process whose parent is already init)."""
    parent = os.getppid()
    if parent <= 1:
        return False

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                print(f"error: {what}: the process that started it ({parent}) has gone; "
                      "stopping", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    return True
