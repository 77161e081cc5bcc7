"""A missing optional dependency names the extra that installs it; other import errors keep their traceback."""

import sys
from pathlib import Path

import pytest

from style_aligned.extras import MissingExtraError, require


def test_missing_extra_names_the_extra() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'style-aligned\[eval\]'"):
        require("no_such_module_here", extra="eval", feature="evaluate")


def test_a_broken_dependency_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_extra.py").write_text("import no_such_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as error:
        require("broken_extra", extra="eval", feature="evaluate")
    assert not isinstance(error.value, MissingExtraError) and error.value.name == "no_such_dependency_of_it"
    sys.modules.pop("broken_extra", None)


def test_command_line_reports_a_missing_extra_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import style_aligned.cli.evaluate as evaluate
    from style_aligned.cli import main as cli

    def run(_: object) -> None:
        require("no_such_module_here", extra="eval", feature="evaluate")

    monkeypatch.setattr(evaluate, "run_evaluate", run)
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", str(tmp_path), "--clip", str(tmp_path), "--dino", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'style-aligned[eval]'" in error
