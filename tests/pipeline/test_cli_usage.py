"""Usage errors Typer finds in the arguments are one ``error:`` line, as user errors are
(reported: ``attnrec serve --port abc`` printed a box of usage text)."""

from __future__ import annotations

import pytest

from tests.support import Attnrec, assert_one_line_error


@pytest.mark.parametrize(("args", "must_contain"), [
    (("serve", "--port", "abc"), ("Invalid value for '--port'", "attnrec serve --help")),
    (("ui", "--workers", "0"), ("Invalid value for '--workers'", "greater than or equal to 1")),
    (("ingest",), ("Missing argument 'paths'", "attnrec ingest --help")),
    (("stats", "--bogus"), ("No such option: --bogus",)),
    (("nosuch",), ("No such command 'nosuch'", "attnrec --help")),
])
def test_a_usage_error_is_one_error_line_with_exit_code_2(cli: Attnrec, args: tuple[str, ...],
                                                           must_contain: tuple[str, ...]) -> None:
    proc = cli.run(*args, ok=False)
    assert_one_line_error(proc, *must_contain)
    assert proc.returncode == 2
    assert "╭" not in proc.stderr + proc.stdout


def test_a_bare_command_prints_the_help(cli: Attnrec) -> None:
    proc = cli.run()
    assert "Usage:" in proc.stdout and "ingest" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("flag", ["valid-users", "test-users"])
def test_a_bad_setting_given_as_a_flag_is_one_error_line(cli: Attnrec, flag: str) -> None:
    proc = cli.run("train", f"--{flag}", "0", ok=False)
    setting = "train." + flag.replace("-", "_")
    assert_one_line_error(proc, f"invalid settings: {setting} = 0: Input should be greater than or equal to 1")
    assert proc.returncode == 1


def test_an_unknown_table_update_is_one_error_line(cli: Attnrec) -> None:
    proc = cli.run("train", "--table-updates", "sometimes", ok=False)
    assert_one_line_error(proc, "invalid settings: train.table_updates = 'sometimes': Input should be 'dense' or 'rows'")
    assert proc.returncode == 1
