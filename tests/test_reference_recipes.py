"""The shipped reference-study recipes (configs/reference_study/) load through the real
config loaders, say what the study did, and run end to end at tiny sizes on the phantom
(ACDC layout) with overrides for sizes and epochs only, so a recipe cannot rot."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import load_config, read_yaml_mapping
from data_prep.prepare_config import PrepareConfig
from finetune.config import FinetuneConfig
from finetune.sweep_config import load_sweep_config
from pretrain.config import PretrainConfig
from tests.ray_cluster import RayCluster

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "reference_study"
PRETRAIN_RECIPES = {  # recipe -> the run folder it writes
    "pretrain_byol_acdc.yaml": "runs/byol-acdc",
    "pretrain_byol_imagenet_acdc.yaml": "runs/byol-imagenet-acdc",
    "pretrain_supervised_imagenet_byol_acdc.yaml": "runs/supervised-imagenet-byol-acdc",
}
WEIGHT_FILES = ["weights/byol_imagenet_resnet50.pth", "weights/resnet50_supervised_imagenet.pth"]
STUDY_INITS = ["random", "supervised-imagenet", "byol-imagenet", "byol-acdc",
               "byol-imagenet-acdc", "supervised-imagenet-byol-acdc"]

# Sizes and epochs only: what makes a recipe tiny, nothing that changes what it does.
PRETRAIN_TINY = ["data.crop_size=32", "data.batch_size=8", "data.workers=1",
                 "data.epoch_samples=16", "data.shuffle_buffer=16",
                 "method.projector_hidden=64", "method.projection_dim=32",
                 "method.predictor_hidden=64", "optim.epochs=2", "optim.warmup_epochs=1",
                 "run.keep_epochs=[1, 2]",
                 # bf16 autocast is ~20x slower than fp32 on CPUs without native bf16
                 # (AVX2-only machines); test_pretrain runs the bf16 path on a small model
                 "run.precision=fp32"]
FINETUNE_TINY = ["epochs=2", "warmup_epochs=1", "batch_size=4", "epoch_samples=8",
                 "val_batch_size=16", "overlays=0"]
SWEEP_TINY = ["base.epochs=1", "base.warmup_epochs=0.5", "base.batch_size=4",
              "base.epoch_samples=4", "base.val_batch_size=16", "budgets=[2]", "seeds=[0]",
              "resources={cpu: 1, gpu: 0}"]


def test_every_recipe_loads_and_says_what_the_study_did(tmp_path: Path) -> None:
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(
        ["prepare_acdc.yaml", "finetune.yaml", "sweep_grid.yaml",
         "sweep_pretraining_length.yaml", *PRETRAIN_RECIPES])
    prepare = load_config(PrepareConfig, RECIPES / "prepare_acdc.yaml")
    assert (prepare.format, prepare.normalization) == ("acdc", "fixed")

    for name in PRETRAIN_RECIPES:
        config = load_config(PretrainConfig, RECIPES / name)
        assert (config.model.arch, config.model.in_chans) == ("resnet50", 1)
        assert (config.data.batch_size, config.data.crop_size) == (128, 224)
        optim = config.optim
        assert (optim.name, optim.lr, optim.weight_decay, optim.eta) == ("lars", 0.5, 1e-5, 0.02)
        assert (optim.trust_ratio, optim.clip_lr) == ("paper", True)
        method = config.method
        assert (method.name, method.projector_hidden, method.projection_dim,
                method.predictor_hidden, method.tau_base) == ("byol", 4096, 256, 8192, 0.99)
        assert method.resolved_view_batchnorm() == "separate"
        assert (config.run.precision, config.run.sync_batchnorm) == ("bf16", True)
        for view in (config.augment.view1, config.augment.view2):
            assert view.scale == (0.08, 1.0) and view.hflip == 0.5
            assert (view.brightness, view.contrast, view.jitter_prob) == (0.2, 0.2, 0.8)
            assert view.blur_prob == 0 and view.rotation == 0 and view.noise_std == 0
            assert view.gamma == (1.0, 1.0)
    assert load_config(PretrainConfig, RECIPES / "pretrain_byol_acdc.yaml").optim.epochs == 400
    for name in list(PRETRAIN_RECIPES)[1:]:  # hierarchical: from ImageNet weights, 25 epochs
        config = load_config(PretrainConfig, RECIPES / name)
        assert config.optim.epochs == 25 and config.model.init in WEIGHT_FILES

    finetune = load_config(FinetuneConfig, RECIPES / "finetune.yaml")
    assert (finetune.arch, finetune.optimizer, finetune.lr, finetune.loss) == \
        ("resnet50", "adam", 1e-4, "jaccard")
    assert (finetune.batch_size, finetune.epochs, finetune.warmup_epochs) == (192, 150, 10)
    assert (finetune.warmup_start_lr, finetune.grad_clip_norm) == (1e-6, 5.0)

    finetune_keys = read_yaml_mapping(RECIPES / "finetune.yaml")
    for name in ("sweep_grid.yaml", "sweep_pretraining_length.yaml"):
        raw = read_yaml_mapping(RECIPES / name)
        assert raw["base"] == finetune_keys, f"{name}: base differs from finetune.yaml"
        load_sweep_config(raw, cwd=tmp_path)  # every key known, the base valid
    grid = load_sweep_config(read_yaml_mapping(RECIPES / "sweep_grid.yaml"), cwd=tmp_path)
    assert list(grid.inits) == STUDY_INITS
    assert grid.budgets == [1, 3, 7, 15, 30, 75, 150, 300, 749, 1498]
    assert grid.seeds == list(range(10))
    length = load_sweep_config(read_yaml_mapping(RECIPES / "sweep_pretraining_length.yaml"),
                               cwd=tmp_path)
    kept = load_config(PretrainConfig, RECIPES / "pretrain_byol_acdc.yaml").run.keep_epochs
    assert length.inits["byol-acdc"]["epochs"] == kept  # only checkpoints the run keeps


def _fake_imagenet_weights(folder: Path) -> None:
    """Stand-ins for the ImageNet files users supply: timm ResNet-50 state dicts with a
    3-channel stem and a classifier, as downloaded weights have."""
    import timm

    for index, name in enumerate(WEIGHT_FILES):
        torch.manual_seed(index)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)


def _sweep(cluster: RayCluster, recipe: str, *overrides: str) -> Path:
    """The sweep recipe on the session's Ray cluster, driven from the study folder."""
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "sweep", "--config", str(RECIPES / recipe),
         "--address", cluster.gcs_address, *SWEEP_TINY, *overrides],
        capture_output=True, text=True, timeout=600, cwd=Path.cwd(),
        env=cluster.env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return Path(next(line for line in done.stdout.splitlines()
                     if line.endswith("results.csv")))


@pytest.mark.slow
def test_the_study_runs_from_its_recipes_at_tiny_sizes(
        phantom_root: Path, cluster: RayCluster, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from data_prep.cli import main as data_prep_main
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    monkeypatch.chdir(tmp_path)  # the recipes' relative paths: a study folder
    _fake_imagenet_weights(tmp_path)
    assert data_prep_main(["prepare", "--config", str(RECIPES / "prepare_acdc.yaml"),
                           "--source", str(phantom_root), "--out", "prepared/acdc",
                           "image_size=64", "min_shards=2"]) == 0

    for recipe, out in PRETRAIN_RECIPES.items():
        assert pretrain_main(["--config", str(RECIPES / recipe), "run.progress=false",
                              *PRETRAIN_TINY]) == 0, recipe
        info = json.loads((tmp_path / out / "export" / "backbone.json").read_text())
        assert info["method"] == "byol"
    chain = json.loads((tmp_path / "runs/byol-imagenet-acdc/export/backbone.json").read_text())
    assert "byol_imagenet_resnet50.pth" in json.dumps(chain)  # hierarchical: started there

    assert finetune_main(["train", "--config", str(RECIPES / "finetune.yaml"), "--data",
                          "prepared/acdc", "--out", "runs/ft", "--init",
                          "runs/byol-acdc/export", "--budget", "4", "--seed", "0",
                          "progress=false", *FINETUNE_TINY]) == 0
    metrics = json.loads((tmp_path / "runs/ft/metrics.json").read_text())
    assert metrics["test"]["dice"] >= 0 and metrics["config"]["grad_clip_norm"] == 5.0

    with (_sweep(cluster, "sweep_grid.yaml")).open() as handle:
        grid = list(csv.DictReader(handle))
    assert sorted(row["init"] for row in grid) == sorted(STUDY_INITS)
    with (_sweep(cluster, "sweep_pretraining_length.yaml",
                 "inits.byol-acdc.epochs=[1, 2]")).open() as h:
        length = list(csv.DictReader(h))
    assert sorted(row["init"] for row in length) == ["byol-acdc-ep0001", "byol-acdc-ep0002",
                                                     "random"]
