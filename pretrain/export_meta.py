"""``backbone.json``: the description an export writes beside its weights.

One writer and one strict reader, as ``data_prep.manifest.Manifest`` has: fine-tuning,
hierarchical pretraining and the init chain read an export through this class only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_json

EXPORT_DIR = "export"  # in a run folder
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"
FORMAT_VERSION = 1  # files from before the version was recorded have the same layout
_OPTIONAL = ("img_size", "checkpoint", "probe")  # written only when set


@dataclass
class BackboneMeta:
    architecture: str  # timm model name
    in_chans: int
    num_features: int
    method: str  # the self-supervised method that trained it
    epochs: int  # finished epochs
    planned_epochs: int
    steps: int
    # What the run started from, local paths absolute (the init chain follows it).
    init: str
    data: dict[str, Any]  # path, and the dataset's name and slice count when it was read
    weights: str = EXPORT_WEIGHTS  # file name, beside this one
    img_size: int | None = None  # models built for one input size (ViTs): the crop
    checkpoint: str | None = None  # the checkpoint exported, when not the run's end
    probe: dict[str, Any] | None = None  # the live probe's summary and curve
    format_version: int = FORMAT_VERSION

    def write(self, folder: str | Path) -> Path:
        record = {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}
        return atomic_write_json(Path(folder) / EXPORT_META, record)

    @classmethod
    def read(cls, path: str | Path) -> BackboneMeta:
        """Read ``path`` (a ``backbone.json``), refusing what this version cannot read."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: export description does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not an export description (a JSON object)")
        version = data.setdefault("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}")
        required = {f.name for f in fields(cls)} - set(_OPTIONAL) - {"weights"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{path}: missing key {missing[0]!r}")
        for key, kind in (("architecture", str), ("in_chans", int), ("epochs", int),
                          ("steps", int), ("init", str), ("weights", str), ("data", dict)):
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"{path}: key {key!r} holds {data[key]!r}, expected "
                                 f"type {kind.__name__}")
        return cls(**data)


def find_backbone_meta(path: Path) -> Path | None:
    """The export description behind ``path``, if there is one: in an export or run
    folder, the file itself, or beside an export's weights."""
    if path.is_dir():
        candidates = [path / EXPORT_META, path / EXPORT_DIR / EXPORT_META]
    elif path.suffix == ".json":
        candidates = [path]
    elif path.suffix == ".safetensors":
        candidates = [path.with_name(EXPORT_META)]
    else:
        candidates = []
    return next((c for c in candidates if c.is_file()), None)
