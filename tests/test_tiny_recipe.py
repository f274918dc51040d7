"""The tiny three-stage recipe (configs/tiny-synthetic.yaml, docs/training.md) ends in a model that answers.

A reduced run of the recipe through the real CLI -- `storm-vlm synth --answers text`, `storm-vlm
train` with the config file for align, sft and long (fewer videos, frames and steps through --set),
`storm-vlm eval` on the held-out questions -- and then the final model's greedy replies are read:
none may be empty (before the recipe was fixed every reply was the empty string, `<|im_end|>` being
the most likely first token), and the static task must be well above chance.
"""

import json
from pathlib import Path

import pytest

from storm_vlm.cli import main

pytestmark = pytest.mark.slow  # about two minutes on two shared cores

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-synthetic.yaml"
QUIET = ["--set", "progress_bar=false", "--set", "tensorboard=false", "--set", "save_steps=0"]
# stage -> --set overrides that shrink the recipe (everything else comes from the config file)
REDUCED = {
    "align": ["max_steps=10"],
    "sft": ["num_frames=8", "max_steps=150"],
    "long": ["num_frames=16", "max_steps=30"],
}


def test_reduced_tiny_recipe_ends_in_a_model_whose_replies_are_not_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's paths (data/synth, runs/tiny-synthetic) are relative
    assert main(["synth", "data/synth", "--videos", "160", "--frames", "16", "--size", "32", "--tasks",
                 "static,transient", "--answers", "text", "--workers", "1"]) == 0
    for stage, sets in REDUCED.items():
        overrides = [arg for s in sets for arg in ("--set", s)]
        assert main(["train", str(CONFIG), "--set", f"stage={stage}", *QUIET, *overrides]) == 0, stage
    final = tmp_path / "runs" / "tiny-synthetic" / "long" / "final"
    assert (final / "config.json").is_file()
    capsys.readouterr()

    assert main(["eval", str(final), "--benchmark", "synthetic", "--data-root", "data/synth", "--output", "eval",
                 "--frames", "16", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    assert "| empty replies | 0 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["counts"]["total"] == 32
    replies = [row["reply"] for row in rows]
    assert all(reply.strip() for reply in replies), replies
    assert results["counts"]["empty_replies"] == 0
    # Most replies name one of the options (by its text: the model was trained on option texts).
    assert results["counts"]["answered"] >= 0.8 * len(rows), replies
    static = results["breakdowns"]["task"]["static"]
    # 16 static questions, chance 1/4: P(>= 9 right by guessing) < 0.01; measured: 16 / 16.
    assert static["correct"] >= 9, (static, replies)
