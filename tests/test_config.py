from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from cluster.config import ConfigError, dump_yaml, load_config
from pretrain.config import PretrainConfig


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 10
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[float, float] = (0.5, 1.0)
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  lr: 0.5\n  steps: 3\n")
    config = load_config(Outer, path, ["inner.lr=1e-3", "sizes=[4, 5, 6]", "pair=[0.1, 2]"])
    assert config.name == "y"
    assert config.inner.lr == pytest.approx(1e-3)
    assert config.inner.steps == 3
    assert config.sizes == [4, 5, 6]
    assert config.pair == (0.1, 2.0)


@pytest.mark.parametrize(("override", "message"), [
    ("inner.lrr=1", "unknown config key 'inner.lrr'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("inner.steps=ten", "'inner.steps' must be an integer"),
    ("inner.steps=1.5", "'inner.steps' must be an integer"),
    ("inner.kind=c", "'inner.kind' must be one of"),
    ("sizes=[1, x]", "'sizes[1]' must be an integer"),
    ("pair=[1]", "'pair' must have 2 items"),
    ("inner=3", "'inner' must be a mapping"),
    ("inner.lr.x=3", "'inner.lr' must be a number"),
    ("name=1", "'name' must be a string"),
    ("novalue", "must look like key.sub=value"),
])
def test_bad_keys_and_types_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Outer, None, [override])


def test_override_below_a_value_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: y\n")
    with pytest.raises(ConfigError, match="name is a value, not a section"):
        load_config(Outer, path, ["name.x=1"])


def test_bad_yaml_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    config = load_config(Outer, None, ["inner.kind=b", "sizes=[7]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(Outer, path) == config


def test_a_section_given_in_part_keeps_its_default_keys() -> None:
    """Overriding one key of view2 keeps view2's own defaults (noise, rare blur), which
    differ from a bare ViewConfig's."""
    config = load_config(PretrainConfig, None, ["augment.view2.scale=[0.2, 1.0]"])
    defaults = PretrainConfig().augment
    assert config.augment.view2.scale == (0.2, 1.0)
    assert config.augment.view2.noise_std == defaults.view2.noise_std > 0
    assert config.augment.view2.blur_prob == defaults.view2.blur_prob
    assert config.augment.view1 == defaults.view1
