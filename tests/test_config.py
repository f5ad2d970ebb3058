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



def test_scientific_notation_parses_for_every_float_key(tmp_path):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; every float key, ``float | None`` ones included, takes it."""
    from essa.adaptation import AdaptConfig
    from essa.finetuning import FinetuneConfig

    for cls in (AdaptConfig, FinetuneConfig):
        cfg = load(cls, overrides=["data.root=x", "optim.lr=5e-4", "optim.min_lr=1e-7", "optim.grad_clip=1e0"])
        assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.min_lr == 1e-7
        assert cfg.optim.grad_clip == 1.0
        path = tmp_path / f"{cls.__name__}.yaml"
        path.write_text("data:\n  root: x\noptim:\n  lr: 1e-4\n  min_lr: 2E-6\n")
        cfg = load(cls, path)
        assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 2e-6
    adapt = load(AdaptConfig, overrides=["data.root=x", "ssl.head_lr=3e-5", "optim.weight_decay=[1e-5, 1e-4]"])
    assert adapt.ssl.head_lr == 3e-5 and adapt.optim.weight_decay == [1e-5, 1e-4]
    assert load(FinetuneConfig, overrides=["optim.weight_decay=5e-2"]).optim.weight_decay == 0.05
    with pytest.raises(ConfigError, match="optim.lr"):
        load(FinetuneConfig, overrides=["optim.lr=fast"])


@pytest.mark.parametrize("command", ["adapt", "finetune"])
def test_scientific_notation_through_the_command_line(command, monkeypatch, tmp_path):
    import essa.adaptation
    import essa.finetuning
    from essa.commands import main

    seen = {}

    def stop(cfg, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # the config is what this test is about: stop before any work

    monkeypatch.setattr(essa.adaptation if command == "adapt" else essa.finetuning, command, stop)
    lr = ["--lr", "5e-4"] if command == "finetune" else ["--set", "optim.lr=5e-4"]
    assert main([command, "--data", str(tmp_path), *lr, "--set", "optim.min_lr=1e-7"]) == 130
    assert seen["cfg"].optim.lr == 5e-4 and seen["cfg"].optim.min_lr == 1e-7


def test_a_list_item_is_set_by_index_or_by_its_name():
    from essa.config import set_dotted

    data = {"datasets": [{"name": "breast", "data": {"root": "a"}}, {"name": "brain", "data": {}}]}
    set_dotted(data, "datasets.0.data.max_train", 64)
    set_dotted(data, "datasets.brain.data.root", "b")
    set_dotted(data, "datasets.-1.ssa_epochs", 3)
    assert data["datasets"] == [{"name": "breast", "data": {"root": "a", "max_train": 64}},
                                {"name": "brain", "data": {"root": "b"}, "ssa_epochs": 3}]
    with pytest.raises(ConfigError, match=r"datasets has 2 items \(indices 0..1\)"):
        set_dotted(data, "datasets.2.data.root", "c")
    with pytest.raises(ConfigError, match="datasets has no item 'lung'; give an index .* or a name: breast, brain"):
        set_dotted(data, "datasets.lung.data.root", "c")
    with pytest.raises(ConfigError, match="datasets is a list; name an item and its key, e.g. datasets.0.root"):
        set_dotted(data, "datasets.root", "c")


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    import yaml

    from essa.commands import main

    assert main(["adapt", "--data", str(tmp_path), "--backbone", "vit_tiny_patch16_224", "--epochs", "2",
                 "--set", "optim.lr=5e-4", "--out", str(tmp_path / "run"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["epochs"] == 2 and printed["optim"]["lr"] == 5e-4 and printed["objective"] == "dinov2"
    assert printed["trainer"]["logger"] == "csv" and printed["data"]["root"] == str(tmp_path)
    assert not (tmp_path / "run").exists()


@dataclass
class WithPresets(Outer):
    PRESETS = {"small": {"inner": {"lr": 0.5, "sizes": [3]}, "options": {"name": "a", "k": 1}}}
    preset: str | None = None


def test_a_preset_fills_the_keys_the_config_leaves_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: small\ninner: {sizes: [7]}\n")
    cfg = load(WithPresets, path)
    assert (cfg.inner.lr, cfg.inner.sizes, cfg.options) == (0.5, [7], {"name": "a", "k": 1})
    assert load(WithPresets, path, overrides=["inner.lr=0.1"]).inner.lr == 0.1
    # a section that names another name replaces the preset's whole; the same name merges
    assert resolve(WithPresets, None, {"preset": "small", "options": {"name": "b"}}).options == {"name": "b"}
    assert resolve(WithPresets, None, {"preset": "small", "options": {"j": 2}}).options == {"name": "a", "k": 1,
                                                                                            "j": 2}
    assert resolve(WithPresets).inner.lr is None  # no preset: the defaults
    # an instance holds its values; naming another preset applies that one under them
    built = WithPresets(preset="small")
    assert resolve(WithPresets, built).inner.lr is None
    with pytest.raises(ConfigError, match="preset='big' is not a preset; valid choices: small"):
        resolve(WithPresets, None, {"preset": "big"})


def test_adapt_preset_on_the_command_line_under_flags_and_set(tmp_path, capsys):
    import yaml

    from essa.commands import main

    base = ["adapt", "--data", str(tmp_path), "--preset", "fast", "--print-config"]
    assert main(base) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == "fast" and printed["tuner"] == {"name": "apla", "options": {"blocks": "last:4"}}
    assert printed["ssl"]["patch_drop"] == 0.5 and printed["ssl"]["truncated_backward"] == "auto"
    assert main([*base, "--tuner", "lora", "--set", "ssl.patch_drop=0"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tuner"] == {"name": "lora", "options": {}} and printed["ssl"]["patch_drop"] == 0
