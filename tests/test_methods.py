"""Each self-supervised method around a timm encoder: a step learns, the head is watched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import MethodConfig
from pretrain.methods import build_method
from pretrain.step import ssl_step
from pretrain.weights import create_encoder

METHODS = ["byol", "simclr", "barlow_twins", "vicreg"]


@pytest.mark.parametrize("name", METHODS)
def test_method_steps_reduce_its_loss_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(MethodConfig(name=name, projector_hidden=64, projection_dim=32),
                          create_encoder("resnet18", 1))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad],
                                  lr=1e-3)
    views = torch.randn(2, 16, 1, 32, 32)
    encoder_before = [p.detach().clone() for p in method.online_encoder.parameters()]
    losses = [float(ssl_step(method, method, optimizer, views[0], views[1], lr=1e-3,
                             momentum=0.99)) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    changed = [not torch.equal(a, b) for a, b in
               zip(encoder_before, method.online_encoder.parameters())]
    assert all(changed)  # every encoder parameter receives a gradient
    assert method.embed(views[0]).shape == (16, 32)
    if name == "byol":  # only BYOL has a momentum target, moved after each step
        assert method.uses_momentum
        assert not any(p.requires_grad for p in method.target_parameters())
    else:
        assert not method.uses_momentum


def test_a_contrastive_method_with_lars_through_the_engine(prepared: Path,
                                                          tmp_path: Path) -> None:
    from pretrain.engine import pretrain
    from tests.conftest import small_pretrain_config

    config = small_pretrain_config(prepared, tmp_path / "run")
    config.method.name = "vicreg"
    config.optim.name, config.optim.lr = "lars", 0.3
    config.optim.epochs = 1
    result = pretrain(config)
    meta = (result.export_dir / "backbone.json").read_text()
    assert '"method": "vicreg"' in meta
    checkpoint = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["lars_adapt"] for g in groups] == [True, False]  # norms and biases excluded
    assert torch.isfinite(torch.tensor(result.final_loss))


@pytest.mark.parametrize("name", ["byol", "simclr"])
def test_accumulated_step_averages_the_micro_batch_gradients(name: str) -> None:
    """Two micro batches in one step: the gradient is the mean of theirs, the reported
    loss the mean of their losses, and the optimizer steps once."""
    from pretrain.step import accumulated_step

    torch.manual_seed(0)
    method = build_method(MethodConfig(name=name, projector_hidden=32, projection_dim=16),
                          create_encoder("resnet18", 1)).double()
    trainable = [p for p in method.parameters() if p.requires_grad]
    micro = [tuple(torch.randn(2, 6, 1, 32, 32, dtype=torch.float64)) for _ in range(2)]
    expected_grads, expected_losses = [], []
    for view1, view2 in micro:
        loss = method(view1, view2)
        expected_losses.append(float(loss))
        expected_grads.append(torch.autograd.grad(loss, trainable))
    optimizer = torch.optim.SGD(trainable, lr=0.0)  # lr 0: the step leaves weights alone
    loss = accumulated_step(method, method, optimizer, iter(micro), 2, lr=0.0, momentum=1.0)
    assert float(loss) == pytest.approx(sum(expected_losses) / 2, rel=1e-12)
    for param, first, second in zip(trainable, *expected_grads):
        torch.testing.assert_close(param.grad, (first + second) / 2, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="needs 3 micro batches, got 2"):
        accumulated_step(method, method, optimizer, iter(micro), 3, lr=0.0, momentum=1.0)


def _per_view_reference(method, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
    """The method's loss written out with one network pass per view, as the reference
    BYOL, Barlow Twins and VICReg implementations run it."""
    from pretrain.losses.barlow_twins import barlow_twins_loss
    from pretrain.losses.byol import byol_loss
    from pretrain.losses.simclr import nt_xent_loss
    from pretrain.losses.vicreg import vicreg_loss

    def embed(view: torch.Tensor) -> torch.Tensor:
        return method.projector(method.online_encoder(view))

    z1, z2 = embed(view1), embed(view2)
    name = type(method).__name__
    if name == "BYOL":
        p1, p2 = method.predictor(z1), method.predictor(z2)
        with torch.no_grad():
            t1 = method.target_projector(method.target_encoder(view1))
            t2 = method.target_projector(method.target_encoder(view2))
        return byol_loss(p1, t2) + byol_loss(p2, t1)
    if name == "BarlowTwins":
        return barlow_twins_loss(z1, z2, method.lambda_offdiag)
    if name == "VICReg":
        sim, var, cov = method.weights
        return vicreg_loss(z1, z2, sim_weight=sim, var_weight=var, cov_weight=cov)
    return nt_xent_loss(z1, z2, method.temperature)


@pytest.mark.parametrize("name", METHODS)
def test_separate_view_batchnorm_equals_one_pass_per_view(name: str) -> None:
    """Loss, gradients and BatchNorm running statistics of ``separate`` are those of two
    independent passes; ``joint`` normalises both views together, which differs."""
    import copy

    torch.manual_seed(0)
    config = MethodConfig(name=name, projector_hidden=32, projection_dim=16,  # type: ignore[arg-type]
                          view_batchnorm="separate")
    method = build_method(config, create_encoder("resnet18", 1)).double()
    reference = copy.deepcopy(method)
    generator = torch.Generator().manual_seed(3)
    view1, view2 = torch.randn(2, 8, 1, 32, 32, generator=generator, dtype=torch.float64)
    # Shift one view so a joint pass would normalise it by visibly different statistics.
    view2 = 2.0 * view2 + 1.0

    loss = method(view1, view2)
    loss.backward()
    expected = _per_view_reference(reference, view1, view2)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for (key, got), want in zip(method.named_parameters(), reference.parameters()):
        if got.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12, msg=key)
    for (key, got), want in zip(method.named_buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)

    joint = copy.deepcopy(reference)
    joint.view_batchnorm = "joint"
    assert not torch.allclose(joint(view1, view2), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("name", "mode"), [("byol", "separate"), ("barlow_twins", "separate"),
                                            ("vicreg", "separate"), ("simclr", "joint")])
def test_view_batchnorm_defaults_follow_the_reference_implementations(name: str,
                                                                      mode: str) -> None:
    method = build_method(MethodConfig(name=name, projector_hidden=16,  # type: ignore[arg-type]
                                       projection_dim=8), create_encoder("resnet18", 1))
    assert method.view_batchnorm == mode
    other = "joint" if mode == "separate" else "separate"
    chosen = build_method(MethodConfig(name=name, projector_hidden=16,  # type: ignore[arg-type]
                                       projection_dim=8, view_batchnorm=other),  # type: ignore[arg-type]
                          create_encoder("resnet18", 1))
    assert chosen.view_batchnorm == other
