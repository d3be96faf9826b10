"""Pretraining optimizers: LARS against a hand-written reference, parameter groups, resume."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from torch import nn

from pretrain.optim import (
    LARS,
    build_pretrain_optimizer,
    is_norm_layer,
    parameter_groups,
    scaled_lr,
)


def reference_lars(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor | None]],
                   adapt: list[bool], lrs: list[float], momentum: float, weight_decay: float,
                   eta: float) -> list[torch.Tensor]:
    """LARS written out per tensor with plain tensor math, as the algorithm is stated."""
    params = [p.clone() for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:  # no gradient: parameter and momentum untouched
                continue
            if adapt[i]:
                g = g + weight_decay * p
                p_norm = torch.sqrt((p * p).sum())
                g_norm = torch.sqrt((g * g).sum())
                trust = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
                update = trust * g
            else:
                update = g
            previous = buffers[i] if buffers[i] is not None else torch.zeros_like(p)
            buffers[i] = momentum * previous + update
            params[i] = p - lr * buffers[i]
    return params


def test_lars_matches_hand_computed_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (3, 2, 3, 3), (5,), (4,), (7, 2)]
    adapt = [True, True, False, False, True]
    initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    steps = 5
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(steps)]
    grads[0][3] = None  # first gradient only on step 2: its buffer starts late
    grads[1][4] = None  # a parameter that gets no gradient on one step
    grads[3][2] = None
    lrs = [0.5, 1.0, 0.8, 0.3, 0.1]  # the engine rewrites group["lr"] every step
    momentum, weight_decay, eta = 0.9, 0.05, 0.02

    params = [nn.Parameter(p.clone()) for p in initial]
    optimizer = LARS([
        {"params": [params[i] for i in (0, 1, 4)], "lars_adapt": True},
        {"params": [params[i] for i in (2, 3)], "lars_adapt": False, "weight_decay": 0.0},
    ], lr=lrs[0], momentum=momentum, weight_decay=weight_decay, eta=eta)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        for p, g in zip(params, grads[step], strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()

    expected = reference_lars(initial, grads, adapt, lrs, momentum, weight_decay, eta)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)
    # The trust ratio really acted: the adapted steps differ from plain momentum SGD.
    plain = reference_lars(initial, grads, [False] * 5, lrs, momentum, 0.0, eta)
    assert not torch.allclose(expected[0], plain[0])


def test_lars_ignores_weight_decay_in_non_adapted_groups() -> None:
    """Biases/norms: plain momentum SGD even if the group's weight_decay is left at the default."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    optimizer = LARS([{"params": [p], "lars_adapt": False}], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -2.05, 2.95], dtype=torch.float64))


def test_lars_mixed_dtypes_in_one_group() -> None:
    gen = torch.Generator().manual_seed(1)
    a32 = torch.randn(4, 3, generator=gen)
    b64 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    ga, gb = torch.randn(4, 3, generator=gen), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    pa, pb = nn.Parameter(a32.clone()), nn.Parameter(b64.clone())
    optimizer = LARS([pa, pb], lr=1.0, weight_decay=0.01, eta=0.1)
    pa.grad, pb.grad = ga.clone(), gb.clone()
    optimizer.step()
    want = reference_lars([a32, b64], [[ga, gb]], [True, True], [1.0], 0.9, 0.01, 0.1)
    torch.testing.assert_close(pa.detach(), want[0])
    torch.testing.assert_close(pb.detach(), want[1])
    assert pa.dtype == torch.float32 and pb.dtype == torch.float64


def test_lars_zero_gradient_and_zero_weight_edge_cases() -> None:
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 4, generator=gen)
    w = torch.randn(3, 4, generator=gen)
    zero_weight = nn.Parameter(torch.zeros(3, 4))  # ||p|| = 0 -> trust 1: plain gradient step
    zero_grad = nn.Parameter(w.clone())  # ||g|| = 0 with no decay -> trust 1, no movement
    both_zero = nn.Parameter(torch.zeros(3, 4))
    optimizer = LARS([zero_weight, zero_grad, both_zero], lr=0.5, weight_decay=0.0, eta=0.001)
    zero_weight.grad = g.clone()
    zero_grad.grad = torch.zeros(3, 4)
    both_zero.grad = torch.zeros(3, 4)
    optimizer.step()
    torch.testing.assert_close(zero_weight.detach(), -0.5 * g)
    zero_weight.grad = None  # it is no longer zero; only the zero-gradient cases go on
    for _ in range(3):
        optimizer.step()
    for p in (zero_weight, zero_grad, both_zero):
        assert torch.isfinite(p).all()
    torch.testing.assert_close(zero_grad.detach(), w)
    assert torch.count_nonzero(both_zero) == 0

    # Zero gradient but weight decay on: the update is pure decay, trust = eta / wd.
    p = nn.Parameter(w.clone())
    optimizer = LARS([p], lr=0.5, weight_decay=0.1, eta=0.001, momentum=0.0)
    p.grad = torch.zeros_like(w)
    optimizer.step()
    torch.testing.assert_close(p.detach(), w - 0.5 * 0.001 * w)


def test_lars_leaves_gradients_untouched() -> None:
    p = nn.Parameter(torch.randn(4, 4))
    grad = torch.randn(4, 4)
    p.grad = grad.clone()
    LARS([p], lr=1.0, weight_decay=0.1).step()
    assert torch.equal(p.grad, grad)


def test_lars_rejects_bad_hyperparameters() -> None:
    p = [nn.Parameter(torch.ones(2, 2))]
    for kwargs in ({"lr": -1.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "weight_decay": -1},
                   {"lr": 0.1, "eta": 0.0}):
        with pytest.raises(ValueError, match="LARS"):
            LARS(p, **kwargs)


def reference_lars_variant(params: list[torch.Tensor],
                           grads_per_step: list[list[torch.Tensor]], adapt: list[bool],
                           lrs: list[float], momentum: float, weight_decay: float, eta: float,
                           trust_ratio: str, clip_lr: bool,
                           eps: float = 1e-8) -> list[torch.Tensor]:
    """Both trust ratios and LARC clipping, per tensor, straight from the formulas."""
    params = [p.clone() for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if adapt[i]:
                u = g + weight_decay * p
                w_norm, g_norm, u_norm = (float(t.norm()) for t in (p, g, u))
                if trust_ratio == "paper":
                    ok = w_norm > 0 and g_norm > 0
                    trust = eta * w_norm / (g_norm + weight_decay * w_norm + eps) if ok else 1.0
                else:
                    ok = w_norm > 0 and u_norm > 0
                    trust = eta * w_norm / u_norm if ok else 1.0
                if clip_lr and ok:
                    trust = min(trust / lr, 1.0) if lr > 0 else 1.0
                update = trust * u
            else:
                update = g
            buffers[i] = update if buffers[i] is None else momentum * buffers[i] + update
            params[i] = p - lr * buffers[i]
    return params


def _run_lars(initial: list[torch.Tensor], grads: list[list[torch.Tensor]], adapt: list[bool],
              lrs: list[float], **kwargs: object) -> list[torch.Tensor]:
    params = [nn.Parameter(p.clone()) for p in initial]
    optimizer = LARS([
        {"params": [p for p, a in zip(params, adapt) if a], "lars_adapt": True},
        {"params": [p for p, a in zip(params, adapt) if not a], "lars_adapt": False,
         "weight_decay": 0.0},
    ], lr=lrs[0], **kwargs)  # type: ignore[arg-type]
    for step_grads, lr in zip(grads, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def _variant_problem(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]],
                                             list[bool]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (3, 2, 3, 3), (5,), (4,), (7, 2)]
    initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(5)]
    return initial, grads, [True, True, False, False, True]


@pytest.mark.parametrize("clip_lr", [False, True])
@pytest.mark.parametrize("trust_ratio", ["update", "paper"])
def test_lars_variants_match_reference(trust_ratio: str, clip_lr: bool) -> None:
    initial, grads, adapt = _variant_problem()
    # one lr of 0 (a warm-up start) and lrs on both sides of the trust ratios (~0.02)
    lrs = [0.0, 1.0, 0.01, 0.3, 0.002]
    hyper = {"momentum": 0.9, "weight_decay": 0.05, "eta": 0.02}
    got = _run_lars(initial, grads, adapt, lrs, trust_ratio=trust_ratio, clip_lr=clip_lr,
                    **hyper)
    want = reference_lars_variant(initial, grads, adapt, lrs, trust_ratio=trust_ratio,
                                  clip_lr=clip_lr, **hyper)  # type: ignore[arg-type]
    for p, w in zip(got, want, strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, w, rtol=1e-10, atol=1e-12)


def test_lars_default_is_the_update_ratio_unclipped() -> None:
    initial, grads, adapt = _variant_problem(1)
    lrs, hyper = [0.5, 1.0, 0.8, 0.3, 0.1], {"momentum": 0.9, "weight_decay": 0.05, "eta": 0.02}
    default = _run_lars(initial, grads, adapt, lrs, **hyper)
    explicit = _run_lars(initial, grads, adapt, lrs, trust_ratio="update", clip_lr=False,
                         **hyper)
    for a, b in zip(default, explicit, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_trust_ratios_differ_only_with_weight_decay(weight_decay: float) -> None:
    initial, grads, adapt = _variant_problem(2)
    lrs, hyper = [0.5] * 5, {"momentum": 0.9, "weight_decay": weight_decay, "eta": 0.02}
    update = _run_lars(initial, grads, adapt, lrs, trust_ratio="update", **hyper)
    paper = _run_lars(initial, grads, adapt, lrs, trust_ratio="paper", **hyper)
    for i, (a, b) in enumerate(zip(update, paper, strict=True)):
        if weight_decay == 0 or not adapt[i]:
            # eps = 1e-8 in the paper's denominator is the only difference left
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        else:
            assert not torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def _one_step(w: torch.Tensor, g: torch.Tensor, lr: float, clip_lr: bool) -> torch.Tensor:
    p = nn.Parameter(w.clone())
    optimizer = LARS([p], lr=lr, momentum=0.0, weight_decay=0.0, eta=0.1, clip_lr=clip_lr)
    p.grad = g.clone()
    optimizer.step()
    return p.detach()


def test_lars_clip_lr_caps_the_rate_only_above_lr() -> None:
    """Clipped, a tensor's rate is min(trust, lr); unclipped it is lr * trust."""
    w = torch.full((4, 4), 1.0, dtype=torch.float64)  # ||w|| = 4
    g = torch.full((4, 4), 0.01, dtype=torch.float64)  # ||g|| = 0.04: trust = 0.1 * 4 / 0.04
    trust = 10.0
    # trust > lr: capped at lr, the plain SGD step
    torch.testing.assert_close(_one_step(w, g, 0.5, clip_lr=True), w - 0.5 * g)
    torch.testing.assert_close(_one_step(w, g, 0.5, clip_lr=False), w - 0.5 * trust * g)
    # trust < lr: the cap does not bind, min(trust / lr, 1) * lr = trust
    torch.testing.assert_close(_one_step(w, g, 50.0, clip_lr=True), w - trust * g)
    torch.testing.assert_close(_one_step(w, g, 50.0, clip_lr=False), w - 50.0 * trust * g)


def test_lars_clip_lr_at_zero_lr_is_finite_and_lifts_the_cap() -> None:
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = 0.5 * w
    p = nn.Parameter(w.clone())
    optimizer = LARS([p], lr=0.0, momentum=0.9, weight_decay=0.0, eta=0.1, clip_lr=True)
    p.grad = g.clone()
    optimizer.step()
    assert torch.equal(p.detach(), w)  # lr 0: nothing moves
    torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], g)  # factor 1


def test_lars_rejects_unknown_trust_ratio() -> None:
    with pytest.raises(ValueError, match=r"optim\.trust_ratio"):
        LARS([nn.Parameter(torch.ones(2, 2))], lr=0.1, trust_ratio="layer")


def test_optim_config_validates_trust_ratio() -> None:
    from cluster.config import ConfigError, from_dict
    from pretrain.config import OptimConfig, PretrainConfig

    assert OptimConfig().trust_ratio == "update" and OptimConfig().clip_lr is False
    with pytest.raises(ValueError, match=r"optim\.trust_ratio"):
        OptimConfig(trust_ratio="layer")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"optim\.trust_ratio"):
        from_dict(PretrainConfig, {"optim": {"trust_ratio": "layer"}})
    config = from_dict(PretrainConfig, {"optim": {"trust_ratio": "paper", "clip_lr": True}})
    assert (config.optim.trust_ratio, config.optim.clip_lr) == ("paper", True)


def _check_groups(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    """Common invariants; returns the names in (decay, no_decay)."""
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = groups
    assert decay["lars_adapt"] is True and no_decay["lars_adapt"] is False
    assert no_decay["weight_decay"] == 0.0
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups or twice in one"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable, "a trainable parameter is missing or a frozen one included"
    named = dict(model.named_parameters())
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            assert named[name] is param
    return set(decay["param_names"]), set(no_decay["param_names"])


def _expected_split(model: nn.Module) -> tuple[set[str], set[str]]:
    """Conv/linear weights decay; biases and every norm parameter do not."""
    decay, no_decay = set(), set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if not param.requires_grad:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)) and param_name == "weight":
                decay.add(full)
            elif param_name == "bias" or is_norm_layer(module):
                no_decay.add(full)
    return decay, no_decay


def test_parameter_groups_resnet18() -> None:
    model = timm.create_model("resnet18", num_classes=0, in_chans=1)
    groups = parameter_groups(model, weight_decay=1e-6)
    decay, no_decay = _check_groups(model, groups)
    want_decay, want_no_decay = _expected_split(model)
    assert decay == want_decay
    assert no_decay == want_no_decay
    assert "conv1.weight" in decay and "bn1.weight" in no_decay and "bn1.bias" in no_decay
    assert groups[0]["weight_decay"] == 1e-6
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) * 2 == len(no_decay)


def test_parameter_groups_vit() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, in_chans=1)
    decay, no_decay = _check_groups(model, parameter_groups(model, weight_decay=0.05))
    want_decay, want_no_decay = _expected_split(model)
    # timm's no_weight_decay(): position embedding and class token are not decayed.
    assert {"pos_embed", "cls_token"} <= no_decay
    assert decay == want_decay
    assert no_decay == want_no_decay | {"pos_embed", "cls_token"}
    assert "patch_embed.proj.weight" in decay and "blocks.0.attn.qkv.weight" in decay
    assert "blocks.0.norm1.weight" in no_decay and "norm.bias" in no_decay


def test_parameter_groups_norm_layers_by_class_and_name() -> None:
    class ChannelNorm(nn.Module):  # a third-party norm whose scale is not a vector
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    model = nn.Sequential(nn.Conv2d(1, 4, 3), ChannelNorm(), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 4, 1, bias=False), nn.LayerNorm(4))
    model[0].bias.requires_grad_(False)
    decay, no_decay = _check_groups(model, parameter_groups(model, 0.1))
    assert decay == {"0.weight", "3.weight"}
    assert no_decay == {"1.scale", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert not is_norm_layer(timm.layers.ConvNormAct(1, 4, 3))


class OnlineTarget(nn.Module):
    """BYOL's layout: a trained online network and a frozen momentum copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.online_encoder = timm.create_model("resnet18", num_classes=0, in_chans=1)
        self.online_projector = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64),
                                              nn.ReLU(), nn.Linear(64, 32))
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)


def test_parameter_groups_skip_frozen_target_and_are_deterministic() -> None:
    torch.manual_seed(0)
    first = OnlineTarget()
    groups = parameter_groups(first, 1e-6)
    _check_groups(first, groups)
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("target_") for n in names)
    assert "online_projector.1.weight" in groups[1]["param_names"]  # BatchNorm1d in the head
    torch.manual_seed(1)
    second = OnlineTarget()
    assert names == [n for g in parameter_groups(second, 1e-6) for n in g["param_names"]]


def test_parameter_groups_rejects_frozen_model() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(model, 0.0)


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def _batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    true_w = torch.randn(8, 1, generator=gen)
    out = []
    for _ in range(count):
        x = torch.randn(32, 8, generator=gen)
        out.append((x, torch.tanh(x @ true_w)))
    return out


def _train(model: nn.Module, optimizer: torch.optim.Optimizer,
           batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    losses = []
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["lars", "lars-paper-clip", "adamw"])
def test_state_dict_round_trip_resumes_identically(name: str) -> None:
    batches = _batches(8)
    model = _tiny_net()
    variant = {"trust_ratio": "paper", "clip_lr": True} if name == "lars-paper-clip" else {}
    name = name.split("-")[0]
    optimizer = build_pretrain_optimizer(name, model, lr=0.5 if name == "lars" else 1e-2,
                                         weight_decay=1e-2, eta=0.02, **variant)  # type: ignore[arg-type]
    _train(model, optimizer, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, batches[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # checkpoints are loaded weights-only
    resumed = _tiny_net(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_pretrain_optimizer(name, resumed, lr=123.0, weight_decay=0.0)
    resumed_optimizer.load_state_dict(saved["optimizer"])  # restores lr, decay, buffers
    assert [g["name"] for g in resumed_optimizer.param_groups] == ["decay", "no_decay"]
    if variant:  # the variant's settings are group settings, restored with the rest
        assert all(g["trust_ratio"] == "paper" and g["clip_lr"]
                   for g in resumed_optimizer.param_groups)
    _train(resumed, resumed_optimizer, batches[4:])
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_adamw_decays_only_the_decay_group() -> None:
    model = _tiny_net()
    optimizer = build_pretrain_optimizer("adamw", model, lr=0.1, weight_decay=0.5)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert all("lars_adapt" not in g for g in optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():  # zero gradients: Adam's step is 0, only decay moves weights
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decay_names = set(optimizer.param_groups[0]["param_names"])
    assert decay_names == {"0.weight", "3.weight"}
    for name, p in model.named_parameters():
        if name in decay_names:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[name])


def test_lars_reduces_a_simple_loss() -> None:
    batches = _batches(40, seed=3)
    model = _tiny_net(seed=3)
    optimizer = build_pretrain_optimizer("lars", model, lr=0.2, weight_decay=1e-4, eta=0.02)
    assert isinstance(optimizer, LARS)
    assert [g["lars_adapt"] for g in optimizer.param_groups] == [True, False]
    losses = _train(model, optimizer, batches)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.25 * sum(losses[:5]), losses


def test_build_optimizer_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"optim\.name"):
        build_pretrain_optimizer("sgd", _tiny_net(), lr=0.1, weight_decay=0.0)


def test_scaled_lr() -> None:
    assert scaled_lr(0.2, 256) == pytest.approx(0.2)
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(1e-3, 128, reference_batch=64) == pytest.approx(2e-3)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)


def test_lars_loads_a_state_dict_saved_before_the_variants() -> None:
    model = _tiny_net()
    optimizer = build_pretrain_optimizer("lars", model, lr=0.5, weight_decay=1e-2, eta=0.02)
    _train(model, optimizer, _batches(2))
    old = optimizer.state_dict()
    for group in old["param_groups"]:  # as a checkpoint from before the keys existed
        for key in ("trust_ratio", "clip_lr", "eps"):
            del group[key]
    resumed = build_pretrain_optimizer("lars", model, lr=0.5, weight_decay=1e-2, eta=0.02,
                                       trust_ratio="paper", clip_lr=True)
    resumed.load_state_dict(old)
    assert all(g["trust_ratio"] == "paper" and g["clip_lr"] and g["eps"] == 1e-8
               for g in resumed.param_groups)
    _train(model, resumed, _batches(2, seed=1))
