"""Checks a sweep passes before any trial starts.

A sweep of hundreds of runs that fails in its 300th trial on a typo wastes a cluster's
night; everything that can be known up front is checked in the driver: the dataset,
every initialisation (loaded for real, with the loader's own error), every budget
against the training split, and the trial's resources against the Ray cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.config import ConfigError
from data_prep.label_budgets import budget_subset
from data_prep.labeled_slices import slice_patients
from data_prep.manifest import Manifest
from finetune.model import build_unet, initialise_encoder
from finetune.sweep_config import SweepConfig, base_config, expand_inits
from pretrain.encoder_init import EncoderInit


def check_sweep(config: SweepConfig) -> None:
    """Raise :class:`ConfigError` naming the key of the first problem found."""
    base = base_config(config)
    try:
        manifest = Manifest.read(config.data)
        patients = slice_patients(config.data, "train")
    except (OSError, ValueError, KeyError) as exc:  # OSError: a store unreachable, denied
        raise ConfigError(f"config key 'data': {exc}") from None
    for budget in config.budgets:
        try:
            budget_subset(patients, budget, base.budget_unit, seed=0)
        except ValueError as exc:
            raise ConfigError(f"config key 'budgets': {exc}") from None
    names = [spec.name for spec in expand_inits(config)]
    if config.baseline not in names and config.baseline != "random":
        raise ConfigError(f"config key 'baseline': {config.baseline!r} is not one of the "
                          f"sweep's inits ({', '.join(names)})")
    for spec in expand_inits(config):
        unet = build_unet(base.arch, 1, manifest.num_classes)
        try:
            init = EncoderInit.parse(spec.init, base.arch, "init")
            initialise_encoder(unet, base.arch, 1, init)
        except Exception as exc:  # the loader's own message, whatever it raised
            raise ConfigError(f"config key 'inits.{spec.name}': {exc}") from None


def check_resources(config: SweepConfig, nodes: list[Mapping[str, Any]]) -> None:
    """Refuse a trial no node of the cluster could ever hold (it would wait forever).

    ``nodes`` are the alive nodes' total resources (``ray.nodes()``'s ``Resources``).
    """
    want = config.resources
    gpus = [float(node.get("GPU", 0)) for node in nodes]
    if want.gpu > 0 and not any(gpus):
        raise ConfigError(f"config key 'resources.gpu': each trial asks for {want.gpu:g} GPU "
                          "but the Ray cluster has no GPU (set resources.gpu=0)")
    fits = [node for node in nodes if float(node.get("CPU", 0)) >= want.cpu
            and float(node.get("GPU", 0)) >= want.gpu]
    if not fits:
        largest = max((float(node.get("CPU", 0)) for node in nodes), default=0)
        raise ConfigError(f"config key 'resources': no Ray node has {want.cpu:g} CPU and "
                          f"{want.gpu:g} GPU for one trial (largest node: {largest:g} CPU, "
                          f"{max(gpus, default=0):g} GPU)")
