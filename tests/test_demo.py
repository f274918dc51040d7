"""The demo end to end in --tiny mode, and a check that its numbers come from real evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storm_vlm.demo.runner import model_dir, run_demo
from storm_vlm.demo.settings import ROWS, VARIANTS, DemoSettings
from storm_vlm.demo.phases import FrameCache, load_model
from storm_vlm.errors import StormError


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """`storm-vlm demo --tiny` end to end, as a user runs it (two seeds, one job)."""
    from storm_vlm.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--tiny", "--output", str(out), "--seeds", "2", "--jobs", "1", "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_demo_writes_claims_rows_and_the_correctness_behind_them(tiny_demo):
    from storm_vlm import StormConfig
    from storm_vlm.demo.stats import accuracy_ci, paired_gap

    out, results = tiny_demo
    on_disk = results
    assert on_disk["seeds"] == [0, 1]
    assert [r["row"] for r in on_disk["rows"]] == [r.name for r in ROWS]
    md = (out / "results.md").read_text()
    assert md.index("| claim |") < md.index("| row |")  # the claims table opens the report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    settings = DemoSettings.tiny_preset()
    tasks, tasks_of = on_disk["tasks"], on_disk["question_tasks"]
    assert tasks == list(settings.tasks) and set(tasks_of.values()) == set(tasks)
    assert len(tasks_of) == on_disk["data"]["num_test"] == len(tasks) * settings.test_per_task
    correctness = {row: {int(s): per for s, per in seeds.items()} for row, seeds in on_disk["correctness"].items()}
    budget = None
    for row in on_disk["rows"]:
        config = StormConfig.from_pretrained(model_dir(out, row["variant"], 0) / "final")
        assert config.projector_type == row["projector"] and config.temporal_pool_size == row["temporal_pool"]
        assert config.projector_bidirectional == row["bidirectional"]
        # token counts are the model's own count for the row's frames and sampling
        assert row["visual_tokens"] == config.num_visual_tokens(row["input_frames"], row["temporal_sample_stride"])
        if row["note"] == "trained setting":  # every variant reads the same token budget
            budget = budget or config.num_visual_tokens(settings.base_frames, 1)
            assert row["visual_tokens"] == budget
        assert row["prefill_ms"] > 0
        # every figure is recomputable from the saved per-question correctness ...
        table = correctness[row["row"]]
        assert row["accuracy"]["average"] == accuracy_ci(table, tasks_of)
        # ... which is what the row's predictions.jsonl says
        for seed in (0, 1):
            preds = _read_predictions(out / "eval" / f"seed{seed}" / row["row"] / "predictions.jsonl")
            assert {p["id"]: p["correct"] for p in preds} == table[seed]
        assert len(row["accuracy"]["average"]["per_seed"]) == 2
        for t in tasks:
            stat = row["accuracy"][t]
            assert stat["low"] <= stat["mean"] <= stat["high"]
            by_seed = [np.mean([table[seed][q] for q, task in tasks_of.items() if task == t]) for seed in (0, 1)]
            assert stat["mean"] == pytest.approx(np.mean(by_seed))

    tokens = {r["row"]: r["visual_tokens"] for r in on_disk["rows"]}
    assert tokens["vila_raw_half"] == tokens["storm_s2"] == budget // 2
    claims = {c["claim"]: c for c in on_disk["claims"]}
    assert sorted(claims) == ["C1", "C2", "C3", "C4", "C5"]
    for c in claims.values():
        assert c["scopes"] and c["paper"]
        for scope in c["scopes"]:
            assert scope["verdict"] in ("reproduced", "contradicted", "inconclusive")
            assert scope["low"] <= scope["gap"] <= scope["high"]
        average = next(s for s in c["scopes"] if s["scope"] == "average")
        gap = paired_gap(correctness[c["row_a"]], correctness[c["row_b"]], tasks_of)
        assert {k: average[k] for k in gap} == gap
    assert [s["scope"] for s in claims["C1"]["scopes"]] == ["within-window", "average"]
    ex = on_disk["example"]
    assert ex["truth"] in "ABCD" and len(ex["options"]) == 4 and ex["question"]
    assert {t["variant"] for t in on_disk["trainings"]} == {v.name for v in VARIANTS}


def test_rerun_reuses_finished_work_and_refuses_other_settings(tiny_demo, tmp_path):
    import shutil

    out, first = tiny_demo
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # a copied (or moved) demo folder resumes too
    again = run_demo(moved, settings=DemoSettings.tiny_preset(), seeds=2, jobs=1, progress=False, log=lambda s: None)
    assert all(t["reused"] for t in again["trainings"])
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in first["rows"]]
    assert again["claims"] == first["claims"]
    with pytest.raises(StormError, match="other settings.*steps"):
        run_demo(out, settings=DemoSettings.tiny_preset(steps=7), jobs=1, progress=False, log=lambda s: None)


def test_frame_cache_matches_load_video(tiny_demo):
    from storm_vlm import load_video

    out, _ = tiny_demo
    video = sorted((out / "data" / "videos").glob("*.mp4"))[0]
    cache = FrameCache(DemoSettings.tiny_preset().video_frames)
    for t in (4, 7, 16, 32):
        np.testing.assert_array_equal(cache.frames(str(video), t), load_video(str(video), num_frames=t).frames)


def test_blind_model_scores_chance_on_transient(tiny_demo, tmp_path):
    """With the projector's output zeroed the model cannot see. On 81 transient questions, real
    generation + extract_choice must then score at chance: the demo's models answer with an
    option's text, a blind model names colours without seeing them, and among the replies that
    name one of the four options only 1 in 4 can be right (the truth is uniform over them).
    An answer leaking through the prompt or a scoring bug would push this far above 25%; and
    the tiny demo model must have learned to reply with an option at all."""
    from storm_vlm.demo.synth import generate_synthetic_benchmark
    from storm_vlm.eval import evaluate
    from storm_vlm.eval.readers import read_synthetic

    out, _ = tiny_demo
    settings = DemoSettings.tiny_preset()
    data = tmp_path / "transient"
    generate_synthetic_benchmark(data, num_videos=90, num_frames=16, size=settings.video_size, seed=7,
                                 split=0.9, tasks=["transient"], num_images=0, workers=1)
    records = read_synthetic(data)
    assert len(records) == 81
    model, processor = load_model(model_dir(out, "vila", 0) / "final")
    handle = model.projector.register_forward_hook(lambda mod, args, output: torch.zeros_like(output))
    try:
        res = evaluate(model, processor, records, tmp_path / "eval", num_frames=settings.base_frames,
                       max_new_tokens=settings.max_new_tokens, progress=False, print_table=False)
    finally:
        handle.remove()
    rows = _read_predictions(tmp_path / "eval" / "predictions.jsonl")
    answered = [r for r in rows if r["status"] == "answered"]
    assert res["counts"]["total"] == len(rows) == 81
    assert len(answered) >= 0.5 * 81, "the tiny demo model should reply with one of the options"
    # binomial(n >= 40, 1/4): sd <= 0.07; 0.2 is about 3 sd
    accuracy_answered = np.mean([r["correct"] for r in answered])
    assert abs(accuracy_answered - 0.25) <= 0.2
    assert res["accuracy"] <= 0.25 + 0.15


def test_settings_reject_bad_values():
    with pytest.raises(StormError, match="steps"):
        DemoSettings.default(steps=0).validate()
    with pytest.raises(StormError, match="--tasks 'transient,colour'"):
        DemoSettings.default(tasks=("transient", "colour")).validate()
    with pytest.raises(StormError, match="answer_format"):
        DemoSettings.default(answer_format="emoji").validate()
    s = DemoSettings.default()
    assert [s.input_frames(r) for r in ROWS if r.variant == "storm_pool4"] == [4 * s.base_frames]
    assert {s.input_frames(r) for r in ROWS if r.note == "trained setting" and "pool" not in r.variant} == {s.base_frames}
