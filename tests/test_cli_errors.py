"""``essa``'s error contract: a user's mistake (an EssaError) is one line and exit 2, Ctrl-C is one line and exit 130,
anything else is a bug and keeps its traceback."""

import re

import pytest

from essa import errors
from essa.commands import main, tuners as tuners_command


def _failing(exc):
    def run(args):
        raise exc
    return run


def test_a_user_mistake_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(tuners_command, "run", _failing(errors.InputError("bad input")))
    assert main(["tuners", "--backbone", "x"]) == 2
    assert capsys.readouterr().err == "essa tuners: error: bad input\n"


@pytest.mark.parametrize("exc", [ValueError("a bug deep inside"), FileNotFoundError("a bug"), RuntimeError("bug")])
def test_any_other_error_is_a_bug_and_keeps_its_traceback(monkeypatch, exc):
    monkeypatch.setattr(tuners_command, "run", _failing(exc))
    with pytest.raises(type(exc)):
        main(["tuners", "--backbone", "x"])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(tuners_command, "run", _failing(KeyboardInterrupt()))
    assert main(["tuners", "--backbone", "x"]) == 130
    assert capsys.readouterr().err == "essa tuners: interrupted\n"


def test_missing_paths_are_essa_errors_and_still_file_not_found(tmp_path):
    from essa import data

    with pytest.raises(errors.NotFoundError) as info:
        data.open_source(tmp_path / "nothing")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, errors.EssaError)


def test_options_that_do_not_parse_are_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path), "-o", "window=[40,"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "-o 'window=[40,': the value is not YAML" in err[0]
    assert main(["data", "inspect", str(tmp_path), "-o", "window"]) == 2
    assert main(["tuners", "--backbone", "x", "--options", "{nope"]) == 2
    assert "--options is not JSON" in capsys.readouterr().err


def _weights(tmp_path, **args):
    from essa import backbones, export

    model = backbones.create("vit_tiny_patch16_224", img_size=32, depth=1, **args)
    return export.save_weights(model.state_dict(), tmp_path / "w.safetensors", export.arch_metadata(model))


def test_image_sizes_the_patch_does_not_divide_fail_before_the_run_directory(tmp_path, capsys):
    weights = _weights(tmp_path, patch_size=4)
    out = tmp_path / "adapt"
    assert main(["adapt", "--weights", str(weights), "--data", str(tmp_path), "--img-size", "30",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "ssl.global_size (--img-size)=30 is not a multiple of the backbone's patch size 4" in err[0]
    assert "use 28 or 32" in err[0] and not out.exists()
    assert main(["adapt", "--weights", str(weights), "--data", str(tmp_path), "--set", "ssl.local_size=10",
                 "--out", str(out)]) == 2
    assert "ssl.local_size=10" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "finetune"
    assert main(["finetune", "--backbone", "vit_tiny_patch16_224", "--set", "backbone.pretrained=false",
                 "--data", str(tmp_path), "--img-size", "40", "--out", str(out)]) == 2
    assert "img_size (--img-size)=40 is not a multiple of the backbone's patch size 16: use 32 or 48" in \
        capsys.readouterr().err and not out.exists()


def test_zero_prototypes_are_refused():
    from essa import config
    from essa.adaptation import AdaptConfig

    with pytest.raises(config.ConfigError, match="ssl.prototypes=0 must be at least 1"):
        config.load(AdaptConfig, overrides=["data.root=x", "ssl.prototypes=0"])


@pytest.mark.parametrize("override, fragment", [
    ("ssl.n_global=0", "ssl.n_global=0 and ssl.n_local=8"),
    ("ssl.n_local=-1", "no negative count"),
    ("ssl.mask_ratio=[0.5, 0.1]", "ssl.mask_ratio=[0.5, 0.1]"),
    ("ssl.mask_probability=2", "ssl.mask_probability=2.0 must be in [0, 1]"),
])
def test_crop_and_mask_options_are_checked_in_the_config(override, fragment):
    from essa import config
    from essa.adaptation import AdaptConfig

    with pytest.raises(config.ConfigError, match=re.escape(fragment)):
        config.load(AdaptConfig, overrides=["data.root=x", override])


def test_evaluate_refuses_an_image_size_the_patch_does_not_divide(tmp_path):
    from essa.evaluate.run import evaluate

    weights = _weights(tmp_path, patch_size=4)
    with pytest.raises(errors.EssaError, match=r"img_size \(--img-size\)=30 .* patch size 4: use 28 or 32"):
        evaluate(backbone={"weights": str(weights)}, data={"root": str(tmp_path)}, img_size=30,
                 out=str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()
