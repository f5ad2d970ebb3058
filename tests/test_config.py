from dataclasses import dataclass, field

import pytest

from essa.config import ConfigError, load, resolve


@dataclass
class Inner:
    lr: float | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    options: dict = field(default_factory=dict)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ninner:\n  lr: 1\n  sizes: [3]\n")
    cfg = load(Outer, path, overrides=["name=b", "inner.sizes=[5, 6]", "options={r: 64}"])
    assert cfg == Outer(name="b", inner=Inner(lr=1.0, sizes=[5, 6]), options={"r": 64})
    assert isinstance(cfg.inner.lr, float)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["inner.lrr=1"], "unknown config key inner.lrr; valid keys of inner: lr, sizes"),
        (["nme=1"], "unknown config key nme; valid keys: name, inner, options"),
        (["inner.sizes=3"], "inner.sizes: expected a list, got 3"),
        (["inner.lr=fast"], "inner.lr"),
        (["name"], "not of the form key.sub=value"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load(Outer, overrides=overrides)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load(Outer, bad)


def test_resolve_merges_sections_into_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1\n")
    cfg = resolve(Outer, path, sections={"inner": {"sizes": [7]}, "name": "s"}, overrides=["inner.lr=2"])
    assert cfg == Outer(name="s", inner=Inner(lr=2.0, sizes=[7]))
    assert resolve(Outer, cfg) == cfg
