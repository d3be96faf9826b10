"""Sweep configs without a Ray cluster: expansion into trials, and every refusal that must
happen before any trial starts (named key, exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError
from finetune.cli import main
from finetune.grid import run_dir_for
from finetune.sweep_checks import check_resources
from finetune.sweep_config import fingerprint, load_sweep_config, plan_trials, trial_config
from finetune.sweep_trial import cap_cuda_memory

BASE = {"arch": "resnet18", "epochs": 2, "batch_size": 8, "overlays": 0, "device": "cpu"}


def _raw(prepared: Path, storage: Path, **keys: object) -> dict:
    return {"name": "s", "storage": str(storage), "data": str(prepared), "base": BASE,
            "inits": {"random": "random"}, "budgets": [4], "seeds": [0], **keys}


@pytest.mark.slow
def test_trials_use_the_grid_layout_and_absolute_paths(prepared: Path, pretrain_run: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").symlink_to(pretrain_run)
    config = load_sweep_config(_raw(
        prepared, Path("rel-storage"), budgets=[4, 8], seeds=[0, 1],
        inits={"random": "random", "ssl": "exports/export",
               "series": {"run": "exports", "epochs": [1, 2]}}))
    assert config.storage == str(tmp_path / "rel-storage")
    trials = plan_trials(config)
    assert len(trials) == 4 * 2 * 2
    assert {t.init_name for t in trials} == {"random", "ssl", "series-ep0001", "series-ep0002"}
    series = [t for t in trials if t.pretrain_epochs == 2]
    assert series[0].init == str(tmp_path / "exports" / "checkpoints" / "epoch0002.pt")
    for trial in trials:
        assert trial.run_dir == str(run_dir_for(tmp_path / "rel-storage" / "s" / "runs",
                                                trial.init_name, trial.budget, trial.seed))
        finetune = trial_config(config, trial)
        assert (finetune.out, finetune.budget, finetune.seed) == (trial.run_dir, trial.budget,
                                                                  trial.seed)
        assert finetune.progress is False and finetune.epochs == 2
    changed = load_sweep_config(_raw(prepared, tmp_path, base={**BASE, "epochs": 3}))
    assert fingerprint(changed) != fingerprint(load_sweep_config(_raw(prepared, tmp_path)))


@pytest.mark.parametrize(("change", "key"), [
    ({"resolution": 3}, "'resolution'"),
    ({"base": {**BASE, "learning_rate": 1}}, "'base.learning_rate'"),
    ({"base": {**BASE, "seed": 1}}, "'base.seed'"),
    ({"resources": {"cpu": 1, "gpus": 1}}, "'resources.gpus'"),
    ({"inits": {"ssl": "missing/export"}}, "'inits.ssl'"),
    ({"inits": {"ssl": {"run": "x", "epochs": [1], "every": 2}}}, "'inits.ssl.every'"),
    ({"budgets": [4, 10_000]}, "'budgets'"),
    ({"seeds": []}, "seeds"),
])
def test_bad_sweep_configs_fail_before_any_trial(prepared: Path, tmp_path: Path, change: dict,
                                                 key: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "storage"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_raw(prepared, storage, **change)))
    assert main(["sweep", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and key in error[0], error
    assert not storage.exists()


def test_an_init_that_cannot_load_fails_with_the_loaders_message(
        prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_raw(prepared, tmp_path / "storage",
                                          inits={"random": "random", "bad": str(broken)})))
    assert main(["sweep", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "'inits.bad'" in error and "not a readable safetensors file" in error


@pytest.mark.slow
def test_an_epoch_series_names_the_missing_checkpoint(prepared: Path, pretrain_run: Path,
                                                      tmp_path: Path) -> None:
    config = load_sweep_config(_raw(prepared, tmp_path,
                                    inits={"ssl": {"run": str(pretrain_run), "epochs": [1, 7]}}))
    with pytest.raises(ConfigError, match=r"inits\.ssl\.epochs.*epoch0007\.pt.*"
                                          r"epoch0001\.pt, epoch0002\.pt"):
        plan_trials(config)


def test_resources_no_node_can_hold_are_refused(prepared: Path, tmp_path: Path) -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    check_resources(load_sweep_config(_raw(prepared, tmp_path, resources={"cpu": 2})), nodes)
    with pytest.raises(ConfigError, match=r"'resources\.gpu'.*no GPU"):
        check_resources(load_sweep_config(_raw(prepared, tmp_path,
                                               resources={"cpu": 1, "gpu": 0.25})), nodes)
    with pytest.raises(ConfigError, match=r"'resources'.*largest node: 2 CPU"):
        check_resources(load_sweep_config(_raw(prepared, tmp_path, resources={"cpu": 4})),
                        nodes)
    check_resources(load_sweep_config(_raw(prepared, tmp_path,
                                           resources={"cpu": 1, "gpu": 0.5})),
                    [{"CPU": 8.0, "GPU": 1.0}])


def test_fractional_gpu_trials_cap_their_cuda_memory() -> None:
    # Mocked: no GPU on this machine. A stand-in for torch.cuda records the call.
    class Cuda:
        def __init__(self) -> None:
            self.calls: list[tuple[float, int]] = []

        def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
            self.calls.append((fraction, device))

    cuda = Cuda()
    assert cap_cuda_memory(0.25, cuda) == 0.25
    assert cap_cuda_memory(1.0, cuda) == 1.0  # a whole GPU: no cap
    assert cuda.calls == [(0.25, 0)]


def test_rayignore_keeps_environments_data_and_outputs_out_of_job_uploads(
        tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _dir_travel

    root = Path(__file__).resolve().parents[1]
    (tmp_path / ".rayignore").write_text((root / ".rayignore").read_text())
    for name in (".venv/bin/python", ".git/HEAD", "prepared/manifest.json",
                 "sweeps/s/runs/x/metrics.json", "demo_out/report.md", "finetune/sweep.py",
                 "sweep.yaml", "ssl/backbone.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    uploaded: list[str] = []
    _dir_travel(tmp_path, [], lambda p: uploaded.append(str(p.relative_to(tmp_path))),
                include_gitignore=True)
    files = {p for p in uploaded if (tmp_path / p).is_file()}
    assert files == {".rayignore", "finetune/sweep.py", "sweep.yaml"}
