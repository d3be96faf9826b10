"""Fine-tuning inputs: label budgets (nested, train-only, oversampled), the slices they load,
encoder initialisation (random, timm, local files, exports, checkpoints, hierarchical
chains), mismatch errors, encoder freezing and the config keys that choose them."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from cluster.config import ConfigError, load_config
from data_prep.label_budgets import REFERENCE_SLICE_BUDGETS, budget_subset
from data_prep.labeled_slices import load_slices, open_split, require_whole_volumes, slice_patients
from data_prep.manifest import Manifest
from finetune.config import FinetuneConfig
from finetune.model import (
    build_finetune_optimizer,
    build_unet,
    initialise_encoder,
    set_encoder_frozen,
)
from finetune.oversampling import epoch_indices, finetune_epoch_samples
from pretrain.encoder_init import EncoderInit
from pretrain.engine import pretrain
from pretrain.weights import EncoderMismatchError, WeightsUnavailableError
from tests.conftest import HubCache, small_pretrain_config

SEEDS = (0, 1, 2, 3, 4)


def _init(text: str, arch: str = "resnet18") -> EncoderInit:
    return EncoderInit.parse(text, arch, "init")
ACDC_TRAIN_SLICES = 1498  # the reference study's largest budget: the whole training split


def _acdc_like_patients(n_patients: int = 80, seed: int = 0) -> np.ndarray:
    """Per-slice patient names of an ACDC-sized training split (8-11 slices x 2 frames)."""
    counts = np.random.default_rng(seed).integers(16, 23, size=n_patients)
    return np.repeat([f"patient{i:03d}" for i in range(n_patients)], counts)


# --- label budgets ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_slice_budgets_are_nested_across_the_reference_budgets(seed: int) -> None:
    patients = np.zeros(ACDC_TRAIN_SLICES)  # slice budgets ignore who the slices belong to
    previous: set[int] = set()
    for budget in REFERENCE_SLICE_BUDGETS:
        subset = budget_subset(patients, budget, "slices", seed)
        assert len(subset) == len(set(subset.tolist())) == budget
        assert np.all(np.diff(subset) > 0)  # sorted, each slice once
        assert previous <= set(subset.tolist()), budget
        previous = set(subset.tolist())
    assert previous == set(range(ACDC_TRAIN_SLICES))  # 1498 of 1498: the whole split


@pytest.mark.parametrize("seed", SEEDS)
def test_patient_budgets_are_nested_and_take_every_slice_of_each_patient(seed: int) -> None:
    patients = _acdc_like_patients()
    previous: set[str] = set()
    for budget in (1, 2, 5, 10, 20, 40, 80):
        subset = budget_subset(patients, budget, "patients", seed)
        chosen = set(patients[subset].tolist())
        assert len(chosen) == budget
        assert previous <= chosen, budget
        # all labeled slices of the chosen patients, and nothing else
        np.testing.assert_array_equal(subset, np.flatnonzero(np.isin(patients, list(chosen))))
        previous = chosen


def test_patient_budgets_do_not_depend_on_slice_order() -> None:
    patients = _acdc_like_patients()
    shuffled = np.random.default_rng(3).permutation(patients)
    for budget in (1, 7, 30):
        ordered = set(patients[budget_subset(patients, budget, "patients", 2)].tolist())
        reordered = set(shuffled[budget_subset(shuffled, budget, "patients", 2)].tolist())
        assert ordered == reordered


@pytest.mark.parametrize("unit,budget", [("slices", 15), ("patients", 3)])
def test_budgets_are_deterministic_per_seed_and_differ_across_seeds(unit: str,
                                                                    budget: int) -> None:
    patients = _acdc_like_patients()
    subsets = {seed: budget_subset(patients, budget, unit, seed) for seed in SEEDS}
    for seed in SEEDS:
        np.testing.assert_array_equal(budget_subset(patients, budget, unit, seed),
                                      subsets[seed])
    for a, b in combinations(SEEDS, 2):
        assert not np.array_equal(subsets[a], subsets[b]), (a, b)


def test_budget_zero_is_the_whole_split() -> None:
    patients = _acdc_like_patients()
    for unit in ("slices", "patients"):
        np.testing.assert_array_equal(budget_subset(patients, 0, unit, 5),
                                      np.arange(len(patients)))


@pytest.mark.slow
def test_budgets_come_from_the_train_split_only(prepared: Path) -> None:
    manifest = Manifest.read(prepared)
    train = slice_patients(prepared, "train")
    held_out = {name for split in ("val", "test")
                for name in slice_patients(prepared, split).tolist()}
    assert held_out and held_out == set(manifest.splits["val"] + manifest.splits["test"])
    n_train_patients = len(set(train.tolist()))
    for seed in SEEDS:
        for unit, budgets in (("slices", (1, 3, 7, 15, 30, len(train))),
                              ("patients", range(1, n_train_patients + 1))):
            for budget in budgets:
                subset = budget_subset(train, budget, unit, seed)
                loaded = load_slices(prepared, "train", subset)
                assert not set(loaded.patients) & held_out, (unit, budget, seed)
                assert set(loaded.patients) <= set(manifest.splits["train"])


def test_patient_budget_on_the_prepared_phantom_loads_whole_patients(prepared: Path) -> None:
    train = slice_patients(prepared, "train")
    subset = budget_subset(train, 2, "patients", seed=1)
    loaded = load_slices(prepared, "train", subset)
    chosen = set(loaded.patients)
    assert len(chosen) == 2
    assert len(loaded) == int(np.isin(train, list(chosen)).sum())
    # both labeled frames of each chosen patient, each as a full stack of slices
    assert {v.split("_")[0] for v in loaded.volumes} == chosen
    for volume in set(loaded.volumes):
        positions = sorted(p for v, p in zip(loaded.volumes, loaded.positions) if v == volume)
        assert positions == list(range(len(positions)))


def test_too_large_budgets_name_the_split_and_its_size(prepared: Path) -> None:
    train = slice_patients(prepared, "train")
    n_patients = len(set(train.tolist()))
    with pytest.raises(ValueError, match=rf"{len(train) + 1} slices exceeds the 'train' "
                                         rf"split, which has {len(train)} annotated slices"):
        budget_subset(train, len(train) + 1, "slices", 0)
    with pytest.raises(ValueError, match=rf"exceeds the 'train' split, which has "
                                         rf"{n_patients} annotated patients"):
        budget_subset(train, n_patients + 1, "patients", 0)
    with pytest.raises(ValueError, match="budget_unit must be one of slices, patients"):
        budget_subset(train, 1, "volumes", 0)  # type: ignore[arg-type]


def test_oversampled_epochs_have_equal_length_across_budgets() -> None:
    epoch_samples = ACDC_TRAIN_SLICES
    patients = np.zeros(ACDC_TRAIN_SLICES)
    for budget in REFERENCE_SLICE_BUDGETS:
        subset = budget_subset(patients, budget, "slices", 0)
        order = epoch_indices(subset, epoch_samples, np.random.default_rng(budget))
        assert len(order) == finetune_epoch_samples(len(subset), epoch_samples) == epoch_samples
        counts = np.unique(order, return_counts=True)[1]
        assert set(np.unique(order).tolist()) == set(subset.tolist())
        assert counts.max() - counts.min() <= 1, budget  # tiled, not skewed
    # without oversampling an epoch is the subset itself; a larger budget is not cut
    assert len(epoch_indices(np.arange(15), 0, np.random.default_rng(0))) == 15
    assert finetune_epoch_samples(2000, epoch_samples) == 2000


# --- loading slices -----------------------------------------------------------------------

def test_slice_sets_carry_patient_position_and_spacing(prepared: Path) -> None:
    store = open_split(prepared, "train")
    chosen = np.array([17, 3, 3, len(store) - 1, 0])  # any order, repeats allowed
    loaded = load_slices(prepared, "train", chosen)
    assert loaded.images.shape == (5, 1, *store.group["image"].shape[1:])
    assert loaded.images.dtype == torch.float32 and loaded.masks.dtype == torch.int64
    assert loaded.spacing.shape == (5, 3) and loaded.spacing.dtype == np.float32
    for row, index in enumerate(chosen.tolist()):
        image, mask = store[index]  # the store's own per-slice path
        np.testing.assert_array_equal(loaded.images[row, 0].numpy(), image)
        np.testing.assert_array_equal(loaded.masks[row].numpy(), mask)
        assert loaded.patients[row] == store.patient_of(index)
        assert loaded.volumes[row] == store.volume_of(index)
        assert loaded.positions[row] == store.slices[index]
        np.testing.assert_array_equal(loaded.spacing[row], store.spacing[index])
    assert np.all(loaded.spacing > 0)
    whole = load_slices(prepared, "val")
    assert len(whole) == len(open_split(prepared, "val")) == len(whole.patients)
    with pytest.raises(IndexError, match=rf"\[0, {len(store)}\) for split 'train'"):
        load_slices(prepared, "train", np.array([len(store)]))



def test_splits_for_3d_metrics_must_hold_whole_volumes(prepared: Path) -> None:
    test = load_slices(prepared, "test")
    assert require_whole_volumes(test, "test") is test
    keep = np.flatnonzero(~((np.array(test.volumes) == test.volumes[0])
                            & (test.positions == 1)))  # one inner slice of one volume gone
    gapped = load_slices(prepared, "test", keep)
    with pytest.raises(ValueError, match=rf"volume {test.volumes[0]} has slices .* gaps"):
        require_whole_volumes(gapped, "test")

# --- encoder initialisation ---------------------------------------------------------------

def _encoder_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.encoder.model.state_dict().items()}


def _assert_imagenet_weights(unet: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """The U-Net encoder holds ``saved`` (a 3-channel timm state dict), stem summed to 1."""
    loaded = unet.encoder.model.state_dict()
    assert set(loaded) == set(saved) - {"fc.weight", "fc.bias"}
    torch.testing.assert_close(loaded["conv1.weight"],
                               saved["conv1.weight"].sum(dim=1, keepdim=True))
    for key in set(loaded) - {"conv1.weight"}:
        assert torch.equal(loaded[key], saved[key]), key


def test_random_init_leaves_the_encoder_alone() -> None:
    torch.manual_seed(0)
    unet = build_unet("resnet18", 1, 4)
    before = _encoder_state(unet)
    assert initialise_encoder(unet, "resnet18", 1, _init("random")) == [
        {"init": "random", "kind": "random"}]
    for key, value in unet.encoder.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_timm_init_reads_the_hub_cache(hub_cache: HubCache) -> None:
    saved = hub_cache("resnet18")  # timm's default tag for resnet18 (a1_in1k)
    unet = build_unet("resnet18", 1, 4)
    chain = initialise_encoder(unet, "resnet18", 1, _init("timm"))
    _assert_imagenet_weights(unet, saved)
    assert chain == [{"init": "timm", "kind": "timm", "weights": "resnet18",
                      "hub_id": "timm/resnet18.a1_in1k"}]
    tagged = build_unet("resnet18", 1, 4)
    chain = initialise_encoder(tagged, "resnet18", 1, _init("timm:resnet18.a1_in1k"))
    assert chain[0]["weights"] == "resnet18.a1_in1k"
    _assert_imagenet_weights(tagged, saved)


def test_timm_init_offline_without_cache_says_how_to_get_the_file(hub_cache: HubCache) -> None:
    unet = build_unet("resnet18", 1, 4)
    before = _encoder_state(unet)
    with pytest.raises(WeightsUnavailableError) as error:
        initialise_encoder(unet, "resnet18", 1, _init("timm:resnet18.a1_in1k"))
    message = str(error.value)
    assert "https://huggingface.co/timm/resnet18.a1_in1k" in message
    assert "set init to its local path" in message and "model.init" not in message
    for key, value in unet.encoder.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"init: Invalid pretrained tag \(nope\)"):
        initialise_encoder(unet, "resnet18", 1, _init("timm:resnet18.nope"))
    with pytest.raises(EncoderMismatchError, match="another architecture than arch 'resnet18'"):
        initialise_encoder(unet, "resnet18", 1, _init("timm:resnet34.a1_in1k"))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_local_timm_named_imagenet_file(tmp_path: Path, fmt: str) -> None:
    saved = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    path = tmp_path / f"resnet18_imagenet.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        safetensors.torch.save_file(saved, str(path))
    else:
        torch.save(saved, path)
    unet = build_unet("resnet18", 1, 4)
    chain = initialise_encoder(unet, "resnet18", 1, _init(str(path)))
    _assert_imagenet_weights(unet, saved)  # classifier dropped, 3 -> 1 channel stem
    assert [link["kind"] for link in chain] == ["weights file"]
    assert chain[0]["source"] == str(path.resolve())


@pytest.mark.slow
def test_unet_encoder_gets_the_exported_weights(pretrain_run: Path) -> None:
    exported = safetensors.torch.load_file(str(pretrain_run / "export" / "backbone.safetensors"))
    for init in (pretrain_run / "export", pretrain_run):  # export folder, or its run folder
        unet = build_unet("resnet18", 1, 4)
        chain = initialise_encoder(unet, "resnet18", 1, _init(str(init)))
        loaded = unet.encoder.model.state_dict()
        assert set(loaded) == set(exported)
        for key, value in exported.items():
            assert torch.equal(loaded[key], value), key
        assert [link["kind"] for link in chain] == ["export", "random"]
        assert chain[0]["method"] == "byol" and chain[0]["epochs"] == 2
        assert chain[0]["data"]["name"] == "phantom"


def _hierarchical_run(prepared: Path, out: Path, init: str) -> Path:
    config = small_pretrain_config(prepared, out, keep_epochs=[1])
    config.model.init, config.optim.epochs = init, 1
    pretrain(config)
    return out


@pytest.mark.slow
def test_hierarchical_chain_imagenet_then_export_then_checkpoint(
        prepared: Path, hub_cache: HubCache, tmp_path: Path) -> None:
    hub_cache("resnet18")
    # ImageNet (timm) -> pretrain run A on it -> pretrain run B started from A's run folder
    run_a = _hierarchical_run(prepared, tmp_path / "a", "timm")
    run_b = _hierarchical_run(prepared, tmp_path / "b", str(run_a))
    exported = safetensors.torch.load_file(str(run_b / "export" / "backbone.safetensors"))

    unet = build_unet("resnet18", 1, 4)
    chain = initialise_encoder(unet, "resnet18", 1, _init(str(run_b / "export")))
    for key, value in unet.encoder.model.state_dict().items():
        assert torch.equal(value, exported[key]), key
    assert [link["kind"] for link in chain] == ["export", "export", "timm"]
    assert chain[0]["source"] == str((run_b / "export" / "backbone.json").resolve())
    assert chain[1]["init"] == str(run_a)
    assert chain[1]["source"] == str((run_a / "export" / "backbone.json").resolve())
    assert chain[2]["hub_id"] == "timm/resnet18.a1_in1k"

    # a kept checkpoint of B: same weights (its only epoch), same history behind it
    kept = build_unet("resnet18", 1, 4)
    chain = initialise_encoder(kept, "resnet18", 1,
                               _init(str(run_b / "checkpoints" / "epoch0001.pt")))
    for key, value in kept.encoder.model.state_dict().items():
        assert torch.equal(value, exported[key]), key
    assert [link["kind"] for link in chain] == ["checkpoint", "export", "timm"]
    assert chain[0]["epochs"] == 1 and chain[0]["method"] == "byol"


@pytest.mark.slow
def test_a_chain_through_a_moved_export_is_marked_unresolved(pretrain_run: Path,
                                                             tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        (export / name).write_bytes((pretrain_run / "export" / name).read_bytes())
    meta = (export / "backbone.json").read_text().replace('"init": "random"',
                                                          '"init": "gone/export"')
    (export / "backbone.json").write_text(meta)
    chain = initialise_encoder(build_unet("resnet18", 1, 4), "resnet18", 1, _init(str(export)))
    assert [(link["kind"], link["init"]) for link in chain] == [
        ("export", str(export)), ("unresolved", "gone/export")]


def _expect_mismatch(unet: torch.nn.Module, arch: str, init: Path, *patterns: str) -> None:
    """``init`` fails with a message matching every pattern and leaves ``unet`` untouched."""
    before = _encoder_state(unet)
    with pytest.raises(EncoderMismatchError) as error:
        initialise_encoder(unet, arch, 1, _init(str(init), arch))
    for pattern in patterns:
        assert pattern in str(error.value), (pattern, str(error.value))
    for key, value in unet.encoder.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no partial load


@pytest.mark.slow
def test_incompatible_encoders_fail_listing_the_keys(pretrain_run: Path, tmp_path: Path) -> None:
    export = pretrain_run / "export"
    # another architecture (the export says resnet18): names it and lists the keys
    _expect_mismatch(build_unet("resnet34", 1, 4), "resnet34", export,
                     "weights are for 'resnet18', the encoder is 'resnet34'",
                     "missing keys: layer1.2.")
    state = safetensors.torch.load_file(str(export / "backbone.safetensors"))
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "layer4.1.bn2.weight"},
                    "missing keys: layer4.1.bn2.weight"),
        "unexpected": ({**state, "extra.weight": torch.zeros(3)},
                       "unexpected keys: extra.weight"),
        "misshaped": ({**state, "layer4.1.bn2.weight": torch.zeros(256)},
                      "shape mismatch: layer4.1.bn2.weight (256,) vs (512,)"),
    }
    for name, (broken, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"  # no backbone.json beside: keys decide
        safetensors.torch.save_file(broken, str(path))
        _expect_mismatch(build_unet("resnet18", 1, 4), "resnet18", path, pattern)
    # an undescribed timm-named file of another architecture
    other = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), other)
    _expect_mismatch(build_unet("resnet18", 1, 4), "resnet18", other,
                     "unexpected keys: layer1.2.")


@pytest.mark.slow
def test_an_export_for_other_input_channels_fails_naming_the_stem(pretrain_run: Path,
                                                                  tmp_path: Path) -> None:
    export = tmp_path / "rgb_export"
    export.mkdir()
    state = safetensors.torch.load_file(str(pretrain_run / "export" / "backbone.safetensors"))
    state["conv1.weight"] = state["conv1.weight"].repeat(1, 3, 1, 1)
    safetensors.torch.save_file(state, str(export / "backbone.safetensors"))
    meta = (pretrain_run / "export" / "backbone.json").read_text()
    (export / "backbone.json").write_text(meta.replace('"in_chans": 1', '"in_chans": 3'))
    _expect_mismatch(build_unet("resnet18", 1, 4), "resnet18", export,
                     "weights are for 3 input channel(s), the encoder takes 1",
                     "shape mismatch: conv1.weight (64, 3, 7, 7) vs (64, 1, 7, 7)")


# --- freezing, optimizer, config ----------------------------------------------------------

def _train_step(unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                images: torch.Tensor, masks: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(unet(images), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def test_frozen_encoder_keeps_weights_and_batchnorm_statistics(prepared: Path) -> None:
    torch.manual_seed(0)
    batch = load_slices(prepared, "train", np.arange(8))
    unet = build_unet("resnet18", 1, 4)
    optimizer = build_finetune_optimizer(unet.parameters(), "adam", 1e-2, 0.0)
    unet.train()
    set_encoder_frozen(unet, True)
    assert not any(p.requires_grad for p in unet.encoder.parameters())
    assert all(p.requires_grad for p in unet.decoder.parameters())
    assert not unet.encoder.model.bn1.training and unet.decoder.training
    encoder_before = _encoder_state(unet)  # running mean/var included
    decoder_before = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
    _train_step(unet, optimizer, batch.images, batch.masks)
    for key, value in unet.encoder.model.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert any(not torch.equal(v, decoder_before[k])
               for k, v in unet.decoder.state_dict().items())

    set_encoder_frozen(unet, False)  # the same optimizer takes the encoder on
    assert all(p.requires_grad for p in unet.encoder.parameters())
    assert unet.encoder.model.bn1.training
    _train_step(unet, optimizer, batch.images, batch.masks)
    after = unet.encoder.model.state_dict()
    assert not torch.equal(after["conv1.weight"], encoder_before["conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], encoder_before["bn1.running_mean"])


def test_optimizer_choice() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(build_finetune_optimizer(params, "adam", 1e-4, 0.0)) is torch.optim.Adam
    adamw = build_finetune_optimizer(params, "adamw", 1e-3, 0.05)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'adamw'"):
        build_finetune_optimizer(params, "sgd", 1e-3, 0.0)  # type: ignore[arg-type]


def test_config_keys_for_budgets_init_freezing_and_optimizer() -> None:
    config = load_config(FinetuneConfig, None, [
        "budget=4", "budget_unit=patients", "epoch_samples=1498", "optimizer=adam",
        "freeze_encoder_epochs=5", "init=timm:resnet50.a1_in1k"])
    assert (config.budget_unit, config.optimizer, config.freeze_encoder_epochs) == (
        "patients", "adam", 5)
    assert config.encoder_init().timm_name == "resnet50.a1_in1k"
    defaults = FinetuneConfig()
    assert (defaults.budget_unit, defaults.optimizer, defaults.freeze_encoder_epochs,
            defaults.epoch_samples) == ("slices", "adamw", 0, 0)
    bad = {
        "budget_unit=volumes": "budget_unit",
        "optimizer=sgd": "optimizer",
        "freeze_encoder_epochs=-1": "freeze_encoder_epochs must be >= 0",
        "freeze_encoder_epochs=200": r"freeze_encoder_epochs \(200\) exceeds epochs \(150\)",
        "epoch_samples=-5": "epoch_samples must be >= 0",
        "budget=-1": "budget must be >= 0",
        "lr=0": "lr must be > 0",
        "init=timm:resnet34.a1_in1k": "another architecture than arch 'resnet50'",
    }
    for override, pattern in bad.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(FinetuneConfig, None, [override])
