"""A fine-tuning run's ``metrics.json``: its typed layout, one writer, one strict reader.

``metrics.json`` is everything a run measured: what it was (init, budget, seed, config),
one record per epoch, the convergence metrics of its validation curve and, once finished,
its test metrics. ``finetune.train`` rewrites it after every epoch (``complete: false``)
and writes it last of all files when the run ends (``complete: true``), so it marks the
run complete. Every reader (a finished run's re-run, the sweep's results table, the study
report, the benchmarks) goes through ``read_run_metrics``: a file from another layout or
version fails there with its path and the key named, not with a ``KeyError`` deep inside
a report. The JSON keys and their order are the dataclass fields below, as users'
notebooks read them.

Versions: 1 is the layout with per-epoch ``validated`` flags and the ``validation``
block (validation every N epochs). Files written before ``format_version`` was recorded
have that layout and are read as version 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.atomic import atomic_write_json
from cluster.config import to_dict
from cluster.storage import is_url, join
from cluster.storage.objects import read_text
from finetune.convergence import convergence_metrics

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig

METRICS_FILE = "metrics.json"  # everything about a run; complete once marked so
FORMAT_VERSION = 1
UNVERSIONED = 1  # the layout of files written before format_version was recorded
CONVERGENCE_BASIS = "validated epochs only; nothing interpolated"


@dataclass
class EpochRecord:
    """One epoch of a run, recorded after its training (and validation, if any)."""

    epoch: int  # 1-based
    step: int  # optimizer steps taken by the end of this epoch
    seconds: float  # training + validation seconds since the run began, resumes included
    train_loss: float  # mean over the epoch's steps
    lr: float  # the learning rate of the epoch's last step
    encoder_frozen: bool  # freeze_encoder_epochs: only the decoder trained
    train_images_per_s: float
    validated: bool  # False between validations (val_every): every val_* field is None
    val_dice: float | None  # volume Dice, mean over foreground classes; selects the best
    val_iou: float | None
    val_dice_per_class: dict[str, float | None] | None
    val_slice_dice: float | None

    @classmethod
    def from_json(cls, data: Any, where: str, source: str | Path) -> EpochRecord:
        """Check one parsed record (``where``: its place in ``source``) and type it."""
        return cls(**_check_keys(cls, data, where, source))


@dataclass
class ValidationSchedule:
    """Which epochs were validated; the convergence metrics rest on those alone."""

    every: int  # val_every (the last epoch is always validated too)
    epochs: list[int]  # the validated epochs so far
    convergence_basis: str = CONVERGENCE_BASIS


@dataclass
class TestMetrics:
    """The best validation epoch's weights on the test split, on 3D volumes."""

    __test__ = False  # not a pytest test class, whatever its name says

    dice: float | None  # mean over foreground classes
    iou: float | None
    hd95_mm: float | None
    dice_per_class: dict[str, float | None]
    summary: dict[str, Any]  # SegmentationMetrics.summary(): slice and volume blocks


@dataclass
class RunMetrics:
    """The content of ``metrics.json``; field order is the file's key order."""

    init: str  # the init's label (FinetuneConfig.label)
    arch: str
    budget: int
    budget_unit: str
    train_slices: int  # labeled training slices the budget selected
    init_chain: list[dict[str, Any]]  # where the encoder weights came from, outermost first
    seed: int
    epochs: list[EpochRecord]
    validation: ValidationSchedule
    convergence: dict[str, Any] | None  # finetune.convergence; None before a validation
    test: TestMetrics | None  # None until the run is complete
    complete: bool
    run_dir: str
    config: dict[str, Any]  # the resolved FinetuneConfig, as cluster.config.to_dict
    format_version: int = FORMAT_VERSION

    @classmethod
    def summarise(cls, config: FinetuneConfig, epochs: list[EpochRecord], train_slices: int,
                  init_chain: list[dict[str, Any]],
                  test: TestMetrics | None = None) -> RunMetrics:
        """The record of a run of ``config`` after ``epochs``; complete when ``test`` is
        given. The convergence metrics come from the validated epochs alone."""
        validated = [e for e in epochs if e.val_dice is not None]
        return cls(
            init=config.label, arch=config.arch, budget=config.budget,
            budget_unit=config.budget_unit, train_slices=train_slices,
            init_chain=init_chain, seed=config.seed, epochs=list(epochs),
            validation=ValidationSchedule(config.val_every, [e.epoch for e in validated]),
            # None until the first validation (the last epoch is always validated)
            convergence=convergence_metrics(
                [e.val_dice for e in validated if e.val_dice is not None],
                [e.step for e in validated], [e.seconds for e in validated],
                config.dice_targets, [e.epoch for e in validated]) if validated else None,
            test=test, complete=test is not None, run_dir=config.out, config=to_dict(config),
        )

    @property
    def validated_epochs(self) -> list[EpochRecord]:
        return [e for e in self.epochs if e.val_dice is not None]

    @property
    def class_names(self) -> list[str]:
        """The foreground classes the test split was scored on (none before the test)."""
        return list(self.test.dice_per_class) if self.test is not None else []

    def to_json(self) -> dict[str, Any]:
        """The file's content: plain dicts and lists, keys in the file's order."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> RunMetrics:
        """Check ``data`` (the parsed file ``source``) strictly and type it."""
        data = dict(_object(data, "", source))
        # no version: written before versions were recorded (a later version that changes
        # the layout converts UNVERSIONED files here, as data_prep's Manifest does)
        version = data.setdefault("format_version", UNVERSIONED)
        if type(version) is not int or version != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {version!r} is not supported "
                             f"(expected {FORMAT_VERSION}; a file without one is read as "
                             f"{UNVERSIONED})")
        _check_keys(cls, data, "", source)
        epochs = _list(data["epochs"], "epochs", source)
        data["epochs"] = [EpochRecord.from_json(e, f"epochs[{i}]", source)
                          for i, e in enumerate(epochs)]
        data["validation"] = ValidationSchedule(
            **_check_keys(ValidationSchedule, data["validation"], "validation", source))
        if data["test"] is not None:
            data["test"] = TestMetrics(**_check_keys(TestMetrics, data["test"], "test", source))
        if data["convergence"] is not None:
            _object(data["convergence"], "convergence", source)
        _object(data["config"], "config", source)
        _list(data["init_chain"], "init_chain", source)
        return cls(**data)


def metrics_path(path: str | Path) -> Path:
    """``path`` itself, or the metrics file in it when it is a run folder."""
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def write_run_metrics(path: str | Path, metrics: RunMetrics) -> Path:
    """Write ``metrics`` atomically to ``path`` (a run folder or the file itself)."""
    return atomic_write_json(metrics_path(path), metrics.to_json())


def read_run_metrics(path: str | Path) -> RunMetrics:
    """The run metrics in ``path`` (a run folder or the file itself; a path or an
    ``s3://`` URL), checked strictly: invalid JSON, an unknown ``format_version``, a
    missing or an unknown key is a ``ValueError`` naming the file and the key."""
    if is_url(path):
        path = str(path) if str(path).endswith(METRICS_FILE) else join(path, METRICS_FILE)
    else:
        path = metrics_path(path)
    absent = FileNotFoundError(f"{path} does not exist: no fine-tuning run wrote it "
                               "(or it has not finished its first epoch)")
    if isinstance(path, Path) and not path.is_file():
        raise absent
    try:
        data = json.loads(read_text(path))
    except FileNotFoundError:
        raise absent from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return RunMetrics.from_json(data, path)


def _check_keys(cls: type, data: Any, where: str, source: str | Path) -> dict[str, Any]:
    """``data`` as a dict holding exactly the fields of the dataclass ``cls``."""
    data = _object(data, where, source)
    names = [f.name for f in fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ValueError(f"{source}: unknown key {_key(where, unknown[0])!r}")
    missing = [name for name in names if name not in data]
    if missing:
        raise ValueError(f"{source}: missing key {_key(where, missing[0])!r}")
    return data


def _object(value: Any, where: str, source: str | Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {repr(where) if where else 'the file'} must be a JSON "
                         f"object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str, source: str | Path) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{source}: {where!r} must be a JSON list, not "
                         f"{type(value).__name__}")
    return value


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
