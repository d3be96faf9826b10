"""Staged units: what one worker made of one patient, kept until the dataset is assembled.

``prepare`` converts patients in parallel; each finished patient lands atomically as one
``.npz`` file (arrays in their source dtype plus a JSON description, no pickles). A
re-run after an interruption skips every patient whose unit exists, and the final
assembly into shards, zarr store and manifest reads only these files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from cluster.atomic import atomic_path, atomic_write_json

STAGING_DIR = "staging"
_IDENTITY = "config.json"


def unit_path(staging: Path, patient: str) -> Path:
    return staging / "units" / (re.sub(r"[^A-Za-z0-9_-]", "_", patient) + ".npz")


def write_unit(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)


def read_unit_meta(path: Path) -> dict[str, Any]:
    with open_unit(path) as unit:
        return json.loads(str(unit["meta"]))


def open_unit(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: staged unit is unreadable ({exc}); delete it and re-run "
                         "to convert that patient again") from None


def claim_staging(staging: Path, identity: dict[str, Any]) -> None:
    """Start or continue staging; refuse units made with another configuration."""
    marker = staging / _IDENTITY
    if marker.is_file():
        if json.loads(marker.read_text()) != identity:
            raise FileExistsError(f"{staging} holds an interrupted preparation made with "
                                  "another config; re-run with that config to finish it, or "
                                  "delete the folder")
        return
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, identity)
