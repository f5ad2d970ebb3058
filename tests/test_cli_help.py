"""Every flag's help names its config key and default; ``--keys`` lists every config key with its default and doc,
and each key it lists is one ``--set`` takes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from essa import config as config_mod
from essa.commands import adapt, build_parser, evaluate, finetune, main, run
from essa.adaptation import AdaptConfig
from essa.evaluate.run import EvalConfig
from essa.finetuning import FinetuneConfig
from essa.study.config import StudyConfig

COMMANDS = [("adapt", AdaptConfig, adapt.ADAPT_FLAGS), ("finetune", FinetuneConfig, finetune.FINETUNE_FLAGS),
            ("evaluate", EvalConfig, evaluate.EVALUATE_FLAGS), ("run", StudyConfig, run.RUN_FLAGS)]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())  # the words, whatever the terminal width wrapped


@pytest.mark.parametrize("command, cls, flags", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_flag_names_its_config_key_and_default(command, cls, flags):
    text = _help(command)
    for key in flags.values():
        try:
            default = config_mod.default_of(cls, key)
        except KeyError:  # a key inside a mapping (a study's data defaults): no default of its own
            default = None
        shown = (f"(config {key})" if default is None else
                 f"config {key}, default {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()})")
        assert shown in text, (command, key, shown)


def test_defaults_are_each_commands_own():
    assert "(config optim.epochs, default 300)" in _help("adapt")
    assert "(config optim.epochs, default 100)" in _help("finetune")
    assert "(config ssl.global_size, default 224)" in _help("adapt")
    assert "(config trainer.precision, default auto)" in _help("finetune")
    assert "(config seeds, default [0])" in _help("run")


def test_a_flag_without_a_key_keeps_its_help_as_written():
    assert "--resume continue the run in --out from its last checkpoint --set" in _help("adapt")


@pytest.mark.parametrize("command, cls", [(c, cls) for c, cls, _ in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_keys_lists_every_key_with_its_default(command, cls, capsys):
    argv = [command, "--keys"] + (["--config", "x.yaml"] if command == "run" else [])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split(": ", 1) for line in out.splitlines() if not line.startswith("    ")]
    keys = config_mod.key_docs(cls)
    assert [k for k, _ in listed] == [k for k, _, _ in keys]
    for (key, shown), (_, default, _) in zip(listed, keys):
        assert (shown == config_mod.REQUIRED) if default == config_mod.REQUIRED else yaml.safe_load(shown) == default


@pytest.mark.parametrize("cls, needed", [(AdaptConfig, ["data.root=images"]), (FinetuneConfig, ["data.root=images"]),
                                         (EvalConfig, ["backbone.name=vit_tiny_patch16_224", "data.root=images"])])
def test_every_listed_key_is_one_set_takes(cls, needed):
    """Setting each listed key to its listed default changes nothing: every key listed is a real key, with its
    real default (``needed``: what a config must say besides)."""
    reference = config_mod.to_dict(config_mod.load(cls, overrides=needed))
    overrides = [f"{key}={yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, default, _ in config_mod.key_docs(cls)]
    assert config_mod.to_dict(config_mod.load(cls, overrides=overrides + needed)) == reference


def test_docs_come_from_the_comments_beside_or_above_each_field():
    keys = {key: (default, doc) for key, default, doc in config_mod.key_docs(AdaptConfig)}
    assert keys["ssl.head_warmup"][0] == 0.1 and "Head warm-up" in keys["ssl.head_warmup"][1]
    assert keys["trainer.progress_every"] == (30.0, "seconds between two progress lines")
    assert keys["optim.recompute_frozen"][0] == "auto"
    assert keys["optim.recompute_frozen"][1].startswith("Recompute the student's frozen block stretches")
    assert keys["ssl.n_global"][1] == ""  # nothing says what it is: no doc invented


@dataclasses.dataclass
class _Base:
    a: int = 1  # the base's a
    # b is above
    # on two lines
    b: str = "x"
    c: float = 0.5


@dataclasses.dataclass
class _Derived(_Base):
    a: int = 2
    d: list = dataclasses.field(default_factory=lambda: [1, 2])  # a list
    e: int = dataclasses.field(default=3)


@dataclasses.dataclass
class _Outer:
    inner: _Derived = dataclasses.field(default_factory=_Derived)
    name: str = dataclasses.field(default="n")  # the name


def test_key_docs_of_nested_and_inherited_fields():
    assert config_mod.key_docs(_Outer) == [
        ("inner.a", 2, "the base's a"), ("inner.b", "x", "b is above on two lines"), ("inner.c", 0.5, ""),
        ("inner.d", [1, 2], "a list"), ("inner.e", 3, ""), ("name", "n", "the name")]
    assert config_mod.default_of(_Outer, "inner.d") == [1, 2]
    with pytest.raises(KeyError):
        config_mod.default_of(_Outer, "inner.z")


def test_a_required_key_is_listed_as_such():
    keys = {key: default for key, default, _ in config_mod.key_docs(StudyConfig)}
    assert keys["ssa.epochs"] == config_mod.REQUIRED and keys["img_size"] == 112


def test_keys_into_a_pipe_closed_early_stops_quietly(tmp_path):
    # `essa adapt --keys | head -1`: head exits after one line; essa stops with the shell's SIGPIPE status and
    # without a BrokenPipeError traceback on stderr
    import subprocess
    import sys

    err = tmp_path / "stderr.txt"
    proc = subprocess.run(f"{sys.executable} -m essa adapt --keys 2>{err} | head -1; echo \"${{PIPESTATUS[0]}}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    first, status = proc.stdout.splitlines()
    assert first.startswith("preset:")  # the first key of AdaptConfig
    assert status == "141"
    assert err.read_text() == ""
