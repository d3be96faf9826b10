"""The live segmentation probe: its curve, its cost, and that it never changes training."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep.manifest import Manifest
from pretrain.config import PretrainConfig, ProbeConfig
from pretrain.engine import pretrain
from pretrain.probe import check_probe_data
from pretrain.probe_log import PROBE_FILE, probe_summary, read_probe_log
from tests.conftest import small_pretrain_config

PROBE = ProbeConfig(every_epochs=1, budget=12, val_volumes=3, steps=15, batch_size=8)


def _config(prepared: Path, out: Path, epochs: int = 2, probe: ProbeConfig | None = None
            ) -> PretrainConfig:
    config = small_pretrain_config(prepared, out, checkpoint_every=1)
    config.optim.epochs = epochs
    return dataclasses.replace(config, probe=probe or ProbeConfig())


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in \
        events.Tags()["scalars"] else []


@pytest.mark.slow
def test_probe_logs_its_curve_and_leaves_training_bit_identical(prepared: Path,
                                                                 tmp_path: Path) -> None:
    plain = pretrain(_config(prepared, tmp_path / "plain"))
    probed = pretrain(_config(prepared, tmp_path / "probed", probe=PROBE))
    # the same losses and the same weights, to the bit
    assert _scalars(tmp_path / "probed", "train/loss") == _scalars(tmp_path / "plain",
                                                                    "train/loss")
    before, after = load_file(str(plain.export_dir / "backbone.safetensors")), \
        load_file(str(probed.export_dir / "backbone.safetensors"))
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not (tmp_path / "plain" / PROBE_FILE).exists()

    steps_per_epoch = probed.steps // 2
    rows = read_probe_log(tmp_path / "probed" / PROBE_FILE)
    assert [(r["epoch"], r["step"]) for r in rows] == [
        (0.0, 0), (1.0, steps_per_epoch), (2.0, 2 * steps_per_epoch)]  # the init included
    classes = Manifest.read(prepared).class_names[1:]
    with (tmp_path / "probed" / PROBE_FILE).open() as handle:
        assert csv.DictReader(handle).fieldnames == [
            "epoch", "step", "dice", *(f"dice_{name}" for name in classes), "seconds"]
    for row in rows:
        assert 0 <= row["dice"] <= 1 and row["seconds"] > 0
    assert [s for s, _ in _scalars(tmp_path / "probed", "probe/dice")] == \
        [r["step"] for r in rows]
    assert [v for _, v in _scalars(tmp_path / "probed", "probe/dice")] == \
        pytest.approx([r["dice"] for r in rows])
    # the export records the summary and the curve
    recorded = json.loads((probed.export_dir / "backbone.json").read_text())["probe"]
    assert recorded == json.loads(json.dumps(probe_summary(rows)))
    best = max(rows, key=lambda r: r["dice"])
    assert recorded["best_epoch"] == best["epoch"] and recorded["probes"] == 3
    assert recorded["epoch_to_95pct"] == next(
        r["epoch"] for r in rows if r["dice"] >= 0.95 * best["dice"])


@pytest.mark.slow
def test_a_restarted_run_neither_repeats_nor_skips_a_probe(prepared: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = pretrain(_config(prepared, out, epochs=1, probe=PROBE))
    rows = read_probe_log(out / PROBE_FILE)
    assert [r["step"] for r in rows] == [0, first.steps]
    # a run killed after its epoch-1 checkpoint but before the probe logged: the restart
    # probes the checkpoint's weights first (the same encoder: the same Dice on the CPU)
    log = out / PROBE_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n")
    second = pretrain(_config(prepared, out, epochs=2, probe=PROBE))
    again = read_probe_log(log)
    assert [r["step"] for r in again] == [0, first.steps, second.steps]
    assert again[0] == rows[0]  # the epoch-0 probe was not run again
    assert again[1]["dice"] == rows[1]["dice"]


def test_probe_setting_errors(prepared: Path) -> None:
    manifest = Manifest.read(prepared)
    config = _config(prepared, Path("unused"), probe=PROBE)
    check_probe_data(config, manifest)  # the phantom has labeled train and val slices
    manifest.labeled_store = {**manifest.labeled_store,
                              "slices": {**manifest.labeled_store["slices"], "val": 0}}
    with pytest.raises(ValueError, match=r"no labeled slices in split\(s\) val; the "
                                         "segmentation probe needs"):
        check_probe_data(config, manifest)
    with pytest.raises(ValueError, match="exclude each other"):
        ProbeConfig(every_epochs=1, every_steps=5)
    with pytest.raises(ValueError, match=r"probe\.steps must be >= 1"):
        ProbeConfig(every_epochs=1, steps=0)
