"""Fine-tuning: label budgets, metrics against MONAI, encoder initialisation, a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from finetune.budgets import epoch_indices, nested_subset
from finetune.config import FinetuneConfig
from finetune.convergence import convergence_metrics
from finetune.metrics import VolumeDice
from finetune.model import build_unet, initialise_encoder
from finetune.train import train_run
from pretrain.weights import EncoderMismatchError


def test_budgets_are_nested_per_seed_and_bounded() -> None:
    previous = np.array([], dtype=int)
    for budget in (1, 3, 7, 15, 30, 75):
        subset = nested_subset(100, budget, seed=4)
        assert len(subset) == len(set(subset.tolist())) == budget
        assert set(previous.tolist()) <= set(subset.tolist())
        previous = subset
    assert not np.array_equal(nested_subset(100, 15, seed=4), nested_subset(100, 15, seed=5))
    assert np.array_equal(nested_subset(100, 0, seed=1), np.arange(100))
    with pytest.raises(ValueError, match="exceeds the 100 annotated slices"):
        nested_subset(100, 101, seed=0)
    order = epoch_indices(np.array([3, 9]), 7, np.random.default_rng(0))
    assert len(order) == 7 and set(order.tolist()) == {3, 9}


def _monai_volume_dice(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = one_hot(torch.from_numpy(pred)[None, None], num_classes, dim=1)
    t = one_hot(torch.from_numpy(true)[None, None], num_classes, dim=1)
    return metric(p, t)[0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_volume_dice_equals_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes, volumes = 4, {}
    dice = VolumeDice(num_classes)
    for v in range(3):
        true = rng.integers(0, num_classes, size=(5, 12, 12))
        pred = np.where(rng.random(true.shape) < 0.7, true, rng.integers(0, 4, true.shape))
        if v == 1:
            true[true == 2] = 0  # an empty class: NaN in MONAI, left out of the mean
        volumes[f"vol{v}"] = (pred, true)
        for z in range(5):  # fed slice by slice, in mixed order across volumes
            dice.update(pred[z:z + 1], true[z:z + 1], [f"vol{v}"])
    ours = dice.per_volume()
    for name, (pred, true) in volumes.items():
        expected = _monai_volume_dice(pred.transpose(1, 2, 0), true.transpose(1, 2, 0), 4)
        np.testing.assert_allclose(ours[name], expected, rtol=1e-6, equal_nan=True)
    assert np.isnan(ours["vol1"][1])
    expected_class_means = np.nanmean(np.stack(list(ours.values())), axis=0)
    np.testing.assert_allclose(dice.per_class(), expected_class_means)


def test_convergence_metrics_on_a_known_curve() -> None:
    curve = [0.1, 0.5, 0.78, 0.8, 0.79, 0.8]
    result = convergence_metrics(curve, steps=[10, 20, 30, 40, 50, 60],
                                 seconds=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], targets=[0.5, 0.9])
    assert result["best_dice"] == 0.8 and result["best_epoch"] == 4
    assert result["epochs_to_95pct"] == 3  # 0.78 >= 0.76
    assert result["steps_to_95pct"] == 30 and result["seconds_to_95pct"] == 3.0
    assert result["epochs_to_99pct"] == 4  # 0.79 < 0.792 until epoch 4
    assert result["epochs_to_dice"] == {"0.5": 2, "0.9": None}
    assert result["normalised_auc"] == pytest.approx(sum(curve) / 6)


def test_unet_encoder_gets_the_exported_weights(pretrain_run: Path) -> None:
    unet = build_unet("resnet18", 1, 4)
    initialise_encoder(unet, "resnet18", 1, str(pretrain_run / "export"))
    exported = safetensors.torch.load_file(str(pretrain_run / "export" / "backbone.safetensors"))
    loaded = unet.encoder.model.state_dict()
    assert set(loaded) == set(exported)
    for key, value in exported.items():
        assert torch.equal(loaded[key], value), key


def test_incompatible_encoders_fail_clearly(pretrain_run: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderMismatchError, match="weights are for 'resnet18'"):
        initialise_encoder(build_unet("resnet34", 1, 4), "resnet34", 1,
                           str(pretrain_run / "export"))
    state = safetensors.torch.load_file(str(pretrain_run / "export" / "backbone.safetensors"))
    del state["layer4.1.bn2.weight"]
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file(state, str(partial))
    with pytest.raises(EncoderMismatchError, match=r"missing keys: layer4\.1\.bn2\.weight"):
        initialise_encoder(build_unet("resnet18", 1, 4), "resnet18", 1, str(partial))
    # An ImageNet-style 3-channel file with a classifier adapts to 1 channel.
    rgb = {k: v for k, v in state.items()}
    rgb["layer4.1.bn2.weight"] = torch.ones(512)
    rgb["conv1.weight"] = torch.randn(64, 3, 7, 7)
    rgb["fc.weight"], rgb["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save({"state_dict": rgb}, tmp_path / "imagenet.pth")
    unet = build_unet("resnet18", 1, 4)
    initialise_encoder(unet, "resnet18", 1, str(tmp_path / "imagenet.pth"))
    torch.testing.assert_close(unet.encoder.model.conv1.weight,
                               rgb["conv1.weight"].sum(dim=1, keepdim=True))


@pytest.mark.parametrize("init", ["random", "ssl"])
def test_short_finetune_beats_all_background(prepared: Path, pretrain_run: Path, tmp_path: Path,
                                             init: str) -> None:
    config = FinetuneConfig(
        data=str(prepared), out=str(tmp_path / init), arch="resnet18",
        init="random" if init == "random" else str(pretrain_run / "export"),
        budget=0, seed=0, epochs=6, batch_size=8, lr=3e-3, warmup_epochs=0.5,
        device="cpu", progress=False, overlays=1,
    )
    metrics = train_run(config)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 7))
    assert metrics["complete"]
    # An all-background prediction scores 0 Dice on every foreground class.
    assert metrics["test"]["dice"] > 0.3, metrics["test"]
    assert metrics["convergence"]["best_dice"] > 0.3
    saved = json.loads((tmp_path / init / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    assert len(list((tmp_path / init / "overlays").glob("*.png"))) == 1
    assert train_run(config) == saved  # a finished run is not repeated
