"""``essa``'s error contract: a user's mistake (an EssaError) is one line and exit 2, Ctrl-C is one line and exit 130,
anything else is a bug and keeps its traceback."""

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
