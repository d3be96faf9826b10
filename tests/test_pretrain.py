"""Pretraining: export fidelity, TensorBoard output, resume, fail-fast errors, augmentation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.augment import augment_view, crop_flip_theta
from pretrain.checkpoint_state import read_checkpoint
from pretrain.config import ViewConfig
from pretrain.engine import pretrain
from pretrain.model import build_model
from pretrain.step import NonFiniteLossError
from pretrain.weights import EncoderMismatchError, read_encoder_weights
from tests.conftest import small_pretrain_config


@pytest.mark.slow
def test_export_loads_into_timm_with_identical_outputs(pretrain_run: Path) -> None:
    export = pretrain_run / "export"
    meta = json.loads((export / "backbone.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["in_chans"] == 1
    assert meta["method"] == "byol" and meta["epochs"] == 2
    timm_model = timm.create_model(
        "resnet18", pretrained=True, num_classes=0, in_chans=1,
        pretrained_cfg_overlay=dict(file=str(export / "backbone.safetensors")),
    ).eval()
    checkpoint = read_checkpoint(pretrain_run / "checkpoints" / "last.pt")
    config = small_pretrain_config(Path("."), Path("."))
    trained = build_model(config)
    trained.load_state_dict(checkpoint.model)
    encoder = trained.online_encoder.eval()
    x = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), encoder(x), rtol=0, atol=0)
    # And the weights moved away from a fresh initialisation: training happened.
    fresh = timm.create_model("resnet18", num_classes=0, in_chans=1)
    assert not torch.equal(fresh.conv1.weight, encoder.conv1.weight)


@pytest.mark.slow
def test_tensorboard_holds_training_scalars_and_views(pretrain_run: Path) -> None:
    events = EventAccumulator(str(pretrain_run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tau", "perf/views_per_s",
            "perf/data_wait_fraction"} <= scalars
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and all(0 <= v <= 8 for v in losses)  # 2 epochs x 3 steps
    taus = [e.value for e in events.Scalars("train/tau")]
    assert taus == sorted(taus) and 0.99 <= taus[0] < taus[-1] <= 1.0
    assert "views/pairs" in events.Tags()["images"]
    assert "collapse/embedding_std" in events.Tags()["histograms"]
    run_info = json.loads((pretrain_run / "run_info.json").read_text())
    assert "torch" in run_info["versions"]
    assert (pretrain_run / "config.yaml").read_text().startswith("data:")


@pytest.mark.slow
def test_rerun_resumes_from_the_latest_checkpoint(prepared: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    first = pretrain(small_pretrain_config(prepared, out))
    assert first.steps == 6
    assert "resuming" not in capsys.readouterr().out
    config = small_pretrain_config(prepared, out)
    config.optim.epochs = 3
    second = pretrain(config)
    assert second.steps == 9  # continued from step 6, not restarted
    printed = capsys.readouterr().out
    assert (f"resuming from {out / 'checkpoints' / 'last.pt'}: epoch 3 of 3, step 6 of 9"
            in printed)
    # progress bars are off in these tests: one line per epoch instead
    assert re.search(r"^epoch 3 of 3: loss \d+\.\d{4}, [\d.]+ views/s, [\d.]+ s$", printed,
                     flags=re.M), printed
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = sorted({e.step for e in events.Scalars("train/loss")})
    assert steps == list(range(1, 10))
    config.model.arch = "resnet34"
    with pytest.raises(ValueError, match="another model "):
        pretrain(config)


def test_bad_config_key_fails_before_any_work(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", f"run.out={tmp_path / 'r'}", "optim.lrr=0.1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "unknown config key 'optim.lrr'" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_incompatible_init_fails_with_the_keys(prepared: Path, pretrain_run: Path,
                                               tmp_path: Path) -> None:
    config = small_pretrain_config(prepared, tmp_path / "r")
    config.model.arch = "resnet34"
    config.model.init = str(pretrain_run / "export")
    with pytest.raises(EncoderMismatchError, match=r"missing keys: layer1\.2\."):
        pretrain(config)
    weights = read_encoder_weights(pretrain_run / "checkpoints" / "last.pt")
    assert "conv1.weight" in weights.state_dict  # a checkpoint works as an init too


def test_augmentation_properties() -> None:
    view = ViewConfig(scale=(0.2, 1.0), hflip=0.5, vflip=0.5, noise_std=0.1)
    generator = torch.Generator().manual_seed(3)
    theta = crop_flip_theta(256, view, generator, torch.device("cpu"))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    # crops stay inside the image: |centre| + half-extent <= 1 in grid coordinates
    assert bool(((theta[:, 0, 2].abs() + width) <= 1 + 1e-6).all())
    assert bool(((theta[:, 1, 2].abs() + height) <= 1 + 1e-6).all())
    assert bool(((width * height) >= 0.2 - 1e-6).all())
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # flips happen

    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    images = images.repeat(4, 1, 1, 1)
    a = augment_view(images, view, 12, torch.Generator().manual_seed(1))
    b = augment_view(images, view, 12, torch.Generator().manual_seed(1))
    assert a.shape == (8, 1, 12, 12) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # same seed, same views
    assert not torch.allclose(a[0], a[2])  # each sample gets its own parameters


@pytest.mark.slow
def test_non_finite_loss_stops_without_touching_the_checkpoint(prepared: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(small_pretrain_config(prepared, out))
    before = (out / "checkpoints" / "last.pt").read_bytes()
    config = small_pretrain_config(prepared, out)
    config.optim.epochs = 3
    config.optim.lr = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ on rank 0"):
        pretrain(config)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_bf16_autocast_trains_and_keeps_float32_weights(prepared: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """run.precision=bf16 (the reference recipes' setting) through the engine, on CPU:
    the step's convolutions run in bf16, the weights in the checkpoint stay float32.
    One step only: bf16 convolutions are ~20x slower than fp32 on AVX2-only CPUs."""
    seen: set[torch.dtype] = set()
    original = torch.nn.Conv2d._conv_forward

    def record_dtype(self: torch.nn.Conv2d, inputs: torch.Tensor, *args: object) -> torch.Tensor:
        out = original(self, inputs, *args)  # type: ignore[arg-type]
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", record_dtype)
    config = small_pretrain_config(prepared, tmp_path / "run")
    config.run.precision = "bf16"
    config.optim.epochs, config.data.epoch_samples = 1, config.data.batch_size
    result = pretrain(config)
    assert torch.bfloat16 in seen  # (the collapse histogram embeds views in float32)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_loss))
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").model
    assert {tensor.dtype for tensor in state.values() if tensor.is_floating_point()} == \
        {torch.float32}


def test_exact_flip_without_crop() -> None:
    view = ViewConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, brightness=0.0,
                      contrast=0.0)
    images = torch.randn(2, 1, 8, 8)
    out = augment_view(images, view, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.flip(3))
