"""Run directories: each run records its resolved config, package versions and git revision."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_json, atomic_write_text
from cluster.config import dump_yaml

TRACKED_PACKAGES = (
    "medssl", "torch", "torchvision", "timm", "segmentation-models-pytorch", "monai",
    "webdataset", "zarr", "numpy", "nvidia-dali-cuda130", "deepspeed", "ray",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(start: Path | None = None) -> str | None:
    """The source tree's commit (with ``-dirty`` when it has local changes), if it is a checkout."""
    where = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def write_run_info(run_dir: str | Path, config: Any, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (versions, revision, command)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(config))
    info = {
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "host": socket.gethostname(),
        "git_revision": git_revision(),
        "versions": package_versions(),
        **(extra or {}),
    }
    atomic_write_json(run_dir / "run_info.json", info)
