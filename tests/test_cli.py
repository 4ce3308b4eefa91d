"""The `crate` command itself: `--help` and `--version` answer without importing torch (the 4 s every
call used to take), and a missing or unknown command is one line, exit 2."""

import subprocess
import sys

import pytest

import crate_cli
from tests.helpers import ROOT


def _run(*argv: str) -> subprocess.CompletedProcess:
    """crate_cli.main in a fresh interpreter, which then says whether torch was imported."""
    code = (
        "import sys, crate_cli\n"
        "try:\n    crate_cli.main(sys.argv[1:])\n"
        "finally:\n    print('torch imported:', 'torch' in sys.modules)"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("flag", ["--help", "-h", "--version"])
def test_help_and_version_answer_without_importing_torch(flag):
    done = _run(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("torch imported: False")
    if flag == "--version":
        assert done.stdout.startswith("crate ")
    else:
        assert all(name in done.stdout for name in crate_cli.COMMANDS)


@pytest.mark.parametrize("argv", [[], ["fly"]])
def test_no_or_an_unknown_command_is_one_line_and_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        crate_cli.main(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert error.startswith("crate: error: ") and "choose one of train, eval" in error
