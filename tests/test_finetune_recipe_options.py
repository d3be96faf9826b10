"""The reference study's fine-tuning recipe options: warm-up from a start rate, gradient
clipping, and their validation (in a plain config and in a sweep's ``base``)."""

from __future__ import annotations

import copy
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster.config import ConfigError, from_dict
from finetune.config import FinetuneConfig
from finetune.device_data import DeviceSlices
from finetune.step import FinetuneStep, build_step
from finetune.sweep_config import base_config, load_sweep_config
from finetune.train import train_run
from pretrain.schedules import warmup_cosine


@pytest.mark.parametrize("warmup_steps", [1, 7, 70])
def test_warmup_climbs_from_the_start_rate_to_lr(warmup_steps: int) -> None:
    start, peak, total = 1e-6, 1e-4, 10 * warmup_steps
    lrs = [warmup_cosine(k, total, warmup_steps, peak, start=start)
           for k in range(warmup_steps)]
    # step k of W: start + (peak - start) (k + 1) / W, from just above start up to peak
    assert lrs[0] == pytest.approx(start + (peak - start) / warmup_steps, rel=1e-12)
    assert lrs[-1] == pytest.approx(peak, rel=1e-12)
    assert all(start < lr <= peak for lr in lrs)
    steps = [b - a for a, b in pairwise(lrs)]
    assert steps == pytest.approx([(peak - start) / warmup_steps] * len(steps), rel=1e-9)
    # then the cosine from the peak, as before
    after = [warmup_cosine(k, total, warmup_steps, peak, start=start)
             for k in range(warmup_steps, total)]
    assert after[0] == peak and all(b <= a for a, b in pairwise(after))


def test_warmup_from_zero_is_bit_identical_to_the_plain_ramp() -> None:
    for warmup_steps in (1, 3, 7, 70, 1234):
        for k in range(warmup_steps):
            for peak in (1e-4, 3e-3, 0.7):
                assert warmup_cosine(k, 5 * warmup_steps, warmup_steps, peak) == \
                    peak * (k + 1) / warmup_steps


def _step_inputs(seed: int = 0) -> tuple[DeviceSlices, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 1, 16, 16, generator=gen)
    masks = torch.randint(0, 3, (6, 16, 16), generator=gen, dtype=torch.uint8)
    cpu = torch.device("cpu")
    return DeviceSlices(images, masks, cpu), torch.arange(6)


def _gradients_after_one_step(grad_clip_norm: float | None) -> tuple[nn.Module, list]:
    """A tiny segmentation net trained one step by the fine-tuning step; its gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    config = FinetuneConfig(lr=1e-3, grad_clip_norm=grad_clip_norm, compile=False,
                            device="cpu")
    step = build_step(model, config, torch.device("cpu"))
    data, index = _step_inputs()
    step(data, index, torch.Generator().manual_seed(1), lr=1e-3)
    return model, [p.grad.detach().clone() for p in model.parameters()]


def _global_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_grad_clip_norm_bounds_the_global_gradient_norm() -> None:
    _, free = _gradients_after_one_step(None)
    unclipped = _global_norm(free)
    limit = unclipped / 10
    _, clipped = _gradients_after_one_step(limit)
    assert _global_norm(clipped) <= limit * (1 + 1e-6)
    assert _global_norm(clipped) == pytest.approx(limit, rel=1e-4)
    for a, b in zip(free, clipped, strict=True):  # one common scale, directions kept
        torch.testing.assert_close(b, a * (limit / unclipped), rtol=1e-4, atol=1e-8)


def test_a_loose_grad_clip_norm_changes_nothing() -> None:
    free_model, free = _gradients_after_one_step(None)
    loose_model, loose = _gradients_after_one_step(1e6)
    for a, b in zip(free, loose, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(free_model.parameters(), loose_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_defaults_leave_the_recipe_unchanged() -> None:
    config = FinetuneConfig()
    assert config.warmup_start_lr == 0.0 and config.grad_clip_norm is None
    step = build_step(nn.Conv2d(1, 3, 1), config, torch.device("cpu"))
    assert step.grad_clip_norm is None


@pytest.mark.parametrize(("keys", "named"), [
    ({"warmup_start_lr": -1e-6}, "warmup_start_lr"),
    ({"warmup_start_lr": 2e-4, "lr": 1e-4}, "warmup_start_lr"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"grad_clip_norm": -5.0}, "grad_clip_norm"),
])
def test_recipe_options_are_validated(keys: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        FinetuneConfig(**keys)
    with pytest.raises(ConfigError, match=named):
        from_dict(FinetuneConfig, keys)


def test_recipe_options_accepted_at_the_bounds_and_from_yaml_numbers() -> None:
    assert FinetuneConfig(lr=1e-4, warmup_start_lr=1e-4).warmup_start_lr == 1e-4
    config = from_dict(FinetuneConfig, {"grad_clip_norm": 5, "warmup_start_lr": 1e-6})
    assert config.grad_clip_norm == 5 and config.warmup_start_lr == 1e-6


def test_a_sweep_base_sets_the_recipe_options(tmp_path: Path) -> None:
    raw = {"name": "s", "storage": str(tmp_path / "storage"), "data": str(tmp_path / "d"),
           "base": {"lr": 1e-4, "warmup_epochs": 10, "warmup_start_lr": 1e-6,
                    "grad_clip_norm": 5.0}}
    base = base_config(load_sweep_config(copy.deepcopy(raw)))
    assert (base.warmup_start_lr, base.grad_clip_norm) == (1e-6, 5.0)
    raw["base"]["grad_clip_norm"] = -1.0
    with pytest.raises(ConfigError, match=r"base.*grad_clip_norm"):
        load_sweep_config(raw)


def test_a_run_warms_up_from_the_start_rate(prepared: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop hands the step the configured ramp, step by step."""
    seen: list[float] = []
    real_call = FinetuneStep.__call__

    def recording_call(self: FinetuneStep, data: DeviceSlices, index: torch.Tensor,
                       generator: torch.Generator, lr: float) -> torch.Tensor:
        seen.append(lr)
        return real_call(self, data, index, generator, lr)

    monkeypatch.setattr(FinetuneStep, "__call__", recording_call)
    config = FinetuneConfig(data=str(prepared), out=str(tmp_path / "run"), arch="resnet10t",
                            budget=4, epochs=1, batch_size=2, epoch_samples=8, lr=1e-3,
                            warmup_epochs=0.75, warmup_start_lr=1e-4, grad_clip_norm=5.0,
                            device="cpu", progress=False, overlays=0, compile=False)
    train_run(config)
    warmup = [1e-4 + (1e-3 - 1e-4) * (k + 1) / 3 for k in range(3)]  # 4 steps/epoch x 0.75
    assert len(seen) == 4 and seen[:3] == pytest.approx(warmup, rel=1e-12)
    assert seen[0] > 1e-4 and seen[2] == pytest.approx(1e-3)
