"""A sweep's configuration and the trials it expands to.

A sweep is the reference study's grid: every encoder initialisation x label budget x
seed is one fine-tuning run. The YAML holds the grid's axes and the fine-tuning keys the
trials share (``base``); :func:`plan_trials` expands it into one :class:`Trial` per run,
each with the run folder ``finetune/grid.py`` would use, so sweeps and local grids write
the same layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, from_dict, to_dict
from cluster.storage import is_url, join, local_path, name_of, parent_of
from cluster.storage.objects import list_files
from cluster.storage.urls import normalize
from finetune.config import FinetuneConfig
from finetune.grid import run_dir_for
from pretrain.checkpoint import CHECKPOINT_DIR, kept_checkpoint_name

# keys of FinetuneConfig the sweep sets per trial; ``base`` may not set them
TRIAL_KEYS = ("data", "out", "init", "init_name", "budget", "seed")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_KEPT = re.compile(r"epoch\d{4,}\.pt")
TRIAL_FILE = "sweep_trial.json"  # in a run folder: what Ray did with it (nodes, threads, time)
# Test-only fault switch: "INIT/budgetNNNNN/seedS@EPOCH" makes that trial raise once,
# after reporting EPOCH. Set in the driver's environment; the sweep forwards it.
FAULT_ENV = "MEDSSL_SWEEP_FAULT"


@dataclass
class TrialResources:
    """What one trial asks of a Ray node. ``gpu`` may be a fraction (0.25: four trials
    share a GPU, each capped to a quarter of its memory); a fine-tuning run uses one
    device, so more than one GPU per trial would sit idle."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpu > 0:
            raise ValueError(f"cpu must be > 0, got {self.cpu}")
        if not 0 <= self.gpu <= 1:
            raise ValueError(f"gpu must lie in [0, 1] (a trial trains on one "
                             f"device; 0.25 packs four trials on a GPU), got {self.gpu}")


@dataclass
class SweepConfig:
    name: str = ""
    # the sweep lives in storage/name/: a file system every node sees, or an s3:// URL
    storage: str = ""
    data: str = ""  # prepared dataset: a path every node sees, or an s3:// URL
    # FinetuneConfig keys shared by every trial (epochs, batch_size, arch, ...)
    base: dict[str, Any] = field(default_factory=dict)
    # name -> init: anything ``finetune train --init`` takes, or a mapping
    # {run: PRETRAIN_RUN, epochs: [1, 5, 25]} for one init per kept epoch checkpoint
    inits: dict[str, Any] = field(default_factory=lambda: {"random": "random"})
    budgets: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's resources allow
    max_failures: int = 2  # retries of a failed trial (each continues from its checkpoint)
    # One driver per sweep: it holds a lease in the sweep's storage, renewed every quarter
    # of this many seconds; a second driver waits for a dead one's lease to lapse.
    lease_s: float = 60.0
    # seconds between the console's tables of running/finished/failed trials
    table_every: float = 60.0
    # the report's comparisons: every init against this one; label efficiency at these
    # test Dice targets
    baseline: str = "random"
    label_targets: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])

    def __post_init__(self) -> None:
        for key in ("name", "storage", "data"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '.', '_', '-'")
        if not self.inits:
            raise ValueError("inits must name at least one initialisation")
        if not self.budgets or any(b < 0 for b in self.budgets):
            raise ValueError(f"budgets must be a non-empty list of numbers >= 0, "
                             f"got {self.budgets}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for key, values in (("budgets", self.budgets), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice: {values}")
        if self.max_concurrent < 0 or self.max_failures < 0:
            raise ValueError("max_concurrent and max_failures must be >= 0")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if any(not 0 < t <= 1 for t in self.label_targets):
            raise ValueError(f"label_targets must lie in (0, 1], got {self.label_targets}")

    @property
    def sweep_dir(self) -> str:
        """The sweep's folder: a path, or a URL when ``storage`` is one."""
        return join(self.storage, self.name)

    @property
    def runs_dir(self) -> str:
        return join(self.sweep_dir, "runs")


@dataclass(frozen=True)
class InitSpec:
    """One initialisation of the grid: its report name and what ``--init`` receives."""

    name: str
    init: str
    pretrain_epochs: int | None = None  # set for an ``epochs:`` series member


@dataclass(frozen=True)
class Trial:
    """One fine-tuning run of the sweep."""

    init_name: str
    init: str
    budget: int
    seed: int
    run_dir: str
    pretrain_epochs: int | None = None

    @property
    def key(self) -> str:
        """Stable, readable id: the run folder below ``runs/``."""
        return f"{self.init_name}/{name_of(parent_of(self.run_dir))}/seed{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_sweep_config(raw: dict[str, Any], cwd: Path | None = None) -> SweepConfig:
    """Validate ``raw`` (YAML plus overrides) and make every path absolute.

    Relative paths are read from ``cwd`` (default: the current folder) now, in the
    driver: Ray Tune runs trials in other working directories and on other nodes.
    """
    config = from_dict(SweepConfig, raw)
    cwd = (cwd or Path.cwd()).resolve()
    config.storage = _absolute(config.storage, cwd)
    config.data = _absolute(config.data, cwd)
    config.inits = {name: _absolute_init(name, value, cwd)
                    for name, value in config.inits.items()}
    base_config(config)  # base keys checked now, before anything starts
    return config


def base_config(config: SweepConfig) -> FinetuneConfig:
    """The FinetuneConfig every trial starts from, ``base`` validated as ``base.KEY``."""
    owned = sorted(set(config.base) & set(TRIAL_KEYS))
    if owned:
        raise ConfigError(f"config key 'base.{owned[0]}' is set per trial by the sweep "
                          "(use data, inits, budgets and seeds)")
    raw = {**config.base, "data": config.data, "out": config.runs_dir}
    raw.setdefault("progress", False)  # trials report through Tune, not progress bars
    return from_dict(FinetuneConfig, raw, prefix="base")


def expand_inits(config: SweepConfig) -> list[InitSpec]:
    """Each init of the sweep; an ``epochs:`` series becomes one init per kept epoch."""
    specs: list[InitSpec] = []
    for name, value in config.inits.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"config key 'inits.{name}': an init name may hold only "
                              "letters, digits, '.', '_' and '-' (it names run folders)")
        if isinstance(value, str):
            specs.append(InitSpec(name, value))
            continue
        folder, epochs = join(value["run"], CHECKPOINT_DIR), value["epochs"]
        # one listing of the run's checkpoints (a path or a URL) for every epoch asked for
        kept = sorted(n for n in list_files(folder) if _KEPT.fullmatch(n))
        for epoch in epochs:
            checkpoint = join(folder, kept_checkpoint_name(epoch))
            if kept_checkpoint_name(epoch) not in kept:
                raise ConfigError(
                    f"config key 'inits.{name}.epochs': {checkpoint} does not exist "
                    f"(kept epoch checkpoints there: {', '.join(kept) or 'none'}; keep more "
                    "with the pretraining key run.keep_epochs)")
            specs.append(InitSpec(f"{name}-ep{epoch:04d}", checkpoint, epoch))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'inits': names repeat after expansion: {names}")
    return specs


def plan_trials(config: SweepConfig) -> list[Trial]:
    """Every (init, budget, seed) of the sweep, in grid order."""
    unit = base_config(config).budget_unit
    return [Trial(spec.name, spec.init, budget, seed,
                  run_dir_for(config.runs_dir, spec.name, budget, seed, unit),
                  spec.pretrain_epochs)
            for spec in expand_inits(config) for budget in config.budgets
            for seed in config.seeds]


def trial_config(config: SweepConfig, trial: Trial) -> FinetuneConfig:
    """The fine-tuning config of one trial: ``base`` plus the trial's own keys."""
    return dataclasses.replace(base_config(config), init=trial.init, init_name=trial.init_name,
                               budget=trial.budget, seed=trial.seed, out=trial.run_dir)


def fingerprint(config: SweepConfig) -> str:
    """A short hash of what the trials will compute: a changed grid or base config gets
    a Tune experiment of its own instead of restoring another one's state."""
    what = {"trials": [t.as_dict() for t in plan_trials(config)],
            "base": to_dict(base_config(config)), "resources": to_dict(config.resources)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _absolute(path: str, cwd: Path) -> str:
    """A URL as given; a path (``file://`` too) made absolute from ``cwd``."""
    if is_url(path):
        return normalize(path)
    resolved = local_path(path).expanduser()
    return str(resolved if resolved.is_absolute() else cwd / resolved)


def _absolute_init(name: str, value: Any, cwd: Path) -> str | dict[str, Any]:
    if isinstance(value, str):
        if value == "random" or value == "timm" or value.startswith("timm:"):
            return value
        return _absolute(value, cwd)
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'inits.{name}' must be an init string or a mapping "
                          f"{{run: PRETRAIN_RUN, epochs: [...]}}, got {value!r}")
    unknown = sorted(set(value) - {"run", "epochs"})
    if unknown:
        raise ConfigError(f"unknown config key 'inits.{name}.{unknown[0]}'; known keys: "
                          "epochs, run")
    if not isinstance(value.get("run"), str):
        raise ConfigError(f"config key 'inits.{name}.run' must be a pretraining run folder")
    epochs = value.get("epochs")
    if (not isinstance(epochs, list) or not epochs
            or not all(isinstance(e, int) and not isinstance(e, bool) and e > 0
                       for e in epochs)):
        raise ConfigError(f"config key 'inits.{name}.epochs' must be a list of epochs >= 1, "
                          f"got {epochs!r}")
    return {"run": _absolute(value["run"], cwd), "epochs": epochs}
