"""What a newcomer meets first: the README's set-up and Python snippet taken literally, its CLI
table, and the CLI misused the usual ways (a typo, the arguments swapped, an output path that
cannot be written). Each user error is one message naming the path or flag and its cause, exit 2."""

import builtins
import re
from pathlib import Path

import pytest
from helpers import random_video, write_mp4

from storm_vlm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _one_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


def test_readme_says_how_to_reach_the_commands_make_installs():
    """`make demo` installs into the Makefile's venv; the README's `storm-vlm ...` lines only run once
    that venv is active, so the set-up section has to say so."""
    venv = re.search(r"^VENV \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert f"source {venv}/bin/activate" in setup


def test_readme_python_snippet_runs_as_written_after_make_demo(qwen2_mamba_dir, tmp_path, monkeypatch):
    """The snippet, verbatim, in a folder laid out as `make demo` leaves it (runs/demo/models/<variant>/final
    and the held-out videos under runs/demo/data/videos)."""
    snippet = README.split("```python", 1)[1].split("```", 1)[0]
    demo = tmp_path / "runs" / "demo"
    (demo / "models" / "storm").mkdir(parents=True)
    (demo / "models" / "storm" / "final").symlink_to(qwen2_mamba_dir)
    (demo / "data" / "videos").mkdir(parents=True)
    for name in ("flash_order_00000", "transient_00000", "static_00000"):
        write_mp4(demo / "data" / "videos" / f"{name}.mp4", random_video(16, 32, 32))
    monkeypatch.chdir(tmp_path)
    printed = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: printed.append(a))
    exec(compile(snippet, "README.md", "exec"), {})
    assert len(printed) == 1 and isinstance(printed[0][0], str)


def test_readme_cli_table_lists_every_command():
    """(Flags the docs give are checked against each command's parser in test_docs_commands.py.)"""
    table = README.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    assert sorted(set(re.findall(r"^\| `storm-vlm (\w+)", table, re.M))) == sorted(COMMANDS)


@pytest.mark.parametrize("argv,names", [
    (["plan", "--modle", "m"], ["storm-vlm plan: error", "--modle", "did you mean --model?"]),
    (["chat", "m", "v.mp4", "-q", "hi", "--frmes", "4"],
     ["storm-vlm chat: error", "--frmes", "did you mean --frames?"]),
    (["chatt", "m", "v.mp4"], ["unknown command 'chatt'", "did you mean chat?"]),
    (["--verison"], ["--verison", "did you mean --version?"]),
])
def test_a_misspelt_flag_or_command_is_named_with_its_right_spelling(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _one_error(capsys, *names)


def test_model_and_video_swapped_or_a_model_given_as_the_video(qwen2_mamba_dir, tmp_path, capsys):
    video = write_mp4(tmp_path / "clip.mp4", random_video(4, 32, 32))
    assert main(["chat", str(video), str(qwen2_mamba_dir), "-q", "?"]) == 2
    _one_error(capsys, str(video), "the model folder comes first")
    assert main(["watch", str(video), str(qwen2_mamba_dir)]) == 2
    _one_error(capsys, "the model folder comes first")
    assert main(["chat", str(qwen2_mamba_dir), str(qwen2_mamba_dir), "-q", "?"]) == 2
    _one_error(capsys, f"{qwen2_mamba_dir}: a model folder", "not a video")


def test_ctrl_c_in_a_conversation_ends_it_quietly(qwen2_mamba_dir, tmp_path, monkeypatch, capsys):
    video = write_mp4(tmp_path / "clip.mp4", random_video(4, 32, 32))

    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    assert main(["chat", str(qwen2_mamba_dir), str(video), "--frames", "2"]) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(root), "--videos", "14", "--frames", "16", "--size", "32", "--workers", "1",
                 "--tasks", "static,transient"]) == 0
    return root


@pytest.mark.parametrize("command", ["eval", "synth", "demo", "profile", "build", "plan"])
def test_an_output_path_that_cannot_be_written_is_one_error_before_any_work(
        command, qwen2_mamba_dir, qwen2_parts, synth_root, tmp_path, capsys):
    """A file where the output folder (or one of its parents) should be: refused with the path named,
    before a model loads, a benchmark is generated or a demo trains."""
    blocker = write_mp4(tmp_path / "clip.mp4", random_video(2, 16, 16))
    under = str(blocker / "out")
    argv = {
        "eval": ["eval", str(qwen2_mamba_dir), "--benchmark", "synthetic", "--data-root", str(synth_root),
                 "--output", under, "--frames", "2", "--no-progress"],
        "synth": ["synth", under, "--videos", "7", "--frames", "16", "--size", "32", "--workers", "1"],
        "demo": ["demo", "--tiny", "--output", under, "--no-progress"],
        "profile": ["profile", str(qwen2_mamba_dir), "--output", under, "--frames", "2", "--compression", "1",
                    "--repeats", "1", "--warmup", "0", "--no-plots"],
        "build": ["build", "--vision", str(qwen2_parts[0]), "--llm", str(qwen2_parts[1]), "--out", under],
        "plan": ["plan", "--model", str(qwen2_mamba_dir), "--json", str(blocker / "plan.json")],
    }[command]
    assert main(argv) == 2
    assert re.search(f"{re.escape(str(blocker))}(: exists and)? is (a file|not a folder)", _one_error(capsys))
    if command != "plan":  # the output folder itself a file
        argv[argv.index(under)] = str(blocker)
        assert main(argv) == 2
        _one_error(capsys, f"{blocker}: exists and is not a folder")


def test_demo_flags_are_named_in_their_errors(tmp_path, capsys):
    assert main(["demo", "--tiny", "--output", str(tmp_path / "d"), "--questions", "0"]) == 2
    _one_error(capsys, "--questions must be an integer >= 1")
    assert not (tmp_path / "d").exists()
