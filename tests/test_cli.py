import subprocess
import sys

import pytest
from helpers import heavy_imports

from storm_vlm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "storm_vlm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "synth" in proc.stdout


@pytest.mark.parametrize("argv,tuned", [(["synth", "{tmp}", "--videos", "0"], True),
                                        (["profile", "--config", "{tmp}/missing.yaml", "--output", "{tmp}",
                                          "--no-tune-malloc"], False)])
def test_commands_tune_the_cpu_allocator_unless_told_not_to(tmp_path, argv, tuned):
    # in a fresh process: the setting is process-wide
    code = (f"from storm_vlm import cli; from storm_vlm.perf import allocator; rc = cli.main({[a.format(tmp=tmp_path) for a in argv]!r}); "
            "print(rc, allocator._ALLOCATOR_STATE.get('tuned'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["2", str(tuned)]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["eval", "--help"], ["serve", "--help"],
                                  ["chat", "--help"], ["train", "--help"], ["demo", "--help"]])
def test_help_and_version_import_no_torch(argv):
    assert heavy_imports(argv, ("torch", "transformers", "av", "numpy", "pandas")) == []


def test_synth_help_gives_every_default():
    import argparse

    from storm_vlm.commands import synth
    from storm_vlm.demo.synth_tasks import TASKS

    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, action.option_strings
    tasks = next(a for a in parser._actions if "--tasks" in a.option_strings)
    assert tasks.default == ",".join(TASKS) and f"(default: all {len(TASKS)})" in tasks.help
