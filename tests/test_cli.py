import subprocess
import sys

from talkinghead.cli import main


def test_help_lists_and_exits_cleanly(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "prepare" in capsys.readouterr().out


def test_version_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "talkinghead.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("talkinghead ")
