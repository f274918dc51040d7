"""The resumable runner with a scripted predictor: resume, kill, broken videos, shards, scoring."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from storm_vlm.errors import StormError
from storm_vlm.eval import evaluate_with_predictor, load_benchmark, score
from storm_vlm.eval.frames import load_record_frames
from storm_vlm.choices import LETTERS
from storm_vlm.eval.records import Record
from storm_vlm.eval.runner import finalize, run_predictions

from test_eval_fixtures import Videos, make_mvbench, make_synthetic


class Scripted:
    """Replies by record position: right letter, wrong option's text, or nonsense (unparsed)."""

    def __init__(self):
        self.calls = []

    def predict(self, record, frames):
        assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
        self.calls.append(record.id)
        k = int(record.id.rsplit("-", 1)[1])
        if k % 3 == 0:
            return f"The answer is {record.answer_letter}."
        if k % 3 == 1:
            return record.options[(record.answer + 1) % len(record.options)]
        return "I cannot tell."


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture
def synth(tmp_path):
    return make_synthetic(tmp_path / "syn", Videos(tmp_path), n=6)


def test_full_run_writes_predictions_results_and_table(synth, tmp_path, capsys):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    res = evaluate_with_predictor(Scripted(), records, out, num_frames=3, progress=False)
    rows = _lines(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [f"syn-{i}" for i in range(6)]
    assert [r["status"] for r in rows] == ["answered", "answered", "unparsed"] * 2
    assert [r["correct"] for r in rows] == [True, False, False] * 2
    assert rows[0]["num_frames"] == 3 and rows[0]["reply"] == "The answer is A."
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["counts"] == {"total": 6, "predicted": 6, "answered": 4, "unparsed": 2, "empty_replies": 0,
                               "model_failures": 0, "decode_failures": 0, "missing": 0, "correct": 2}
    assert saved["accuracy"] == pytest.approx(2 / 6)
    # synthetic breaks down by task: ids 0,2,4 are "order", 1,3,5 "count"
    assert saved["breakdowns"]["task"]["order"] == {"correct": 1, "count": 3, "accuracy": pytest.approx(1 / 3)}
    assert saved["breakdowns"]["task"]["count"]["correct"] == 1
    assert saved["unparsed_ids"] == ["syn-2", "syn-5"]
    assert saved["settings"]["num_frames"] == 3 and saved["settings"]["benchmark"] == "synthetic"
    table = (out / "results.md").read_text()
    assert "| accuracy (questions seen) | 33.33 |" in table and "| count | 33.33 | 1 / 3 |" in table
    assert "| unparsed | 2 |" in capsys.readouterr().out


def test_empty_replies_are_counted_as_such(synth, tmp_path, capsys):
    class Silent(Scripted):
        def predict(self, record, frames):
            reply = super().predict(record, frames)
            return "" if reply == "I cannot tell." else reply

    res = evaluate_with_predictor(Silent(), load_benchmark("synthetic", synth), tmp_path / "out", num_frames=3,
                                  progress=False)
    assert res["counts"]["unparsed"] == res["counts"]["empty_replies"] == 2
    assert "| empty replies | 2 |" in capsys.readouterr().out


def test_broken_and_missing_videos_are_recorded_and_the_run_goes_on(synth, tmp_path):
    (synth / "videos" / "1.mp4").write_bytes(b"this is not a video")
    (synth / "videos" / "4.mp4").unlink()
    records = load_benchmark("synthetic", synth)
    predictor = Scripted()
    res = evaluate_with_predictor(predictor, records, tmp_path / "out", num_frames=2, progress=False,
                                  print_table=False)
    rows = {r["id"]: r for r in _lines(tmp_path / "out" / "predictions.jsonl")}
    assert rows["syn-1"]["status"] == "decode_error" and "1.mp4" in rows["syn-1"]["error"]
    assert "VideoDecodeError" in rows["syn-1"]["error"] and rows["syn-1"]["correct"] is False
    assert rows["syn-4"]["status"] == "decode_error" and "no such file" in rows["syn-4"]["error"]
    assert predictor.calls == ["syn-0", "syn-2", "syn-3", "syn-5"]
    c = res["counts"]
    assert (c["decode_failures"], c["answered"], c["unparsed"], c["total"]) == (2, 2, 2, 6)
    assert res["accuracy"] == pytest.approx(2 / 4) and res["accuracy_all"] == pytest.approx(2 / 6)
    assert res["decode_failure_ids"] == ["syn-1", "syn-4"]


def test_retry_failed_redoes_only_the_decode_failures(synth, tmp_path):
    good = (synth / "videos" / "1.mp4").read_bytes()
    (synth / "videos" / "1.mp4").write_bytes(b"broken")
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    evaluate_with_predictor(Scripted(), records, out, num_frames=2, progress=False, print_table=False)
    (synth / "videos" / "1.mp4").write_bytes(good)
    plain = Scripted()
    res = evaluate_with_predictor(plain, records, out, num_frames=2, progress=False, print_table=False)
    assert plain.calls == [] and res["counts"]["decode_failures"] == 1
    retry = Scripted()
    res = evaluate_with_predictor(retry, records, out, num_frames=2, progress=False, print_table=False,
                                  retry_failed=True)
    assert retry.calls == ["syn-1"] and res["counts"]["decode_failures"] == 0
    rows = _lines(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [f"syn-{i}" for i in range(6)] and rows[1]["status"] == "answered"


class FailsOn(Scripted):
    """Scripted, but raises on the given ids (one at a time and in any batch holding one)."""

    def __init__(self, *bad):
        super().__init__()
        self.bad, self.batches = set(bad), []

    def predict(self, record, frames):
        if record.id in self.bad or "*" in self.bad:
            raise RuntimeError(f"out of memory on {record.id}")
        return super().predict(record, frames)

    def predict_batch(self, records, frames):
        self.batches.append([r.id for r in records])
        if any(r.id in self.bad for r in records):
            raise RuntimeError("out of memory in a batch")
        return [Scripted.predict(self, r, f) for r, f in zip(records, frames)]


def test_a_question_the_model_raises_on_is_recorded_counted_wrong_and_tried_again(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    res = evaluate_with_predictor(FailsOn("syn-3"), records, out, num_frames=2, progress=False, print_table=False)
    rows = {r["id"]: r for r in _lines(out / "predictions.jsonl")}
    assert rows["syn-3"]["status"] == "model_error" and rows["syn-3"]["reply"] is None
    assert rows["syn-3"]["error"] == "RuntimeError: out of memory on syn-3"
    assert [rows[f"syn-{i}"]["status"] for i in (4, 5)] == ["answered", "unparsed"]  # the run went on
    assert res["counts"]["model_failures"] == 1 and res["model_failure_ids"] == ["syn-3"]
    assert res["accuracy"] == pytest.approx(1 / 6)  # syn-3 would have been right: counted wrong, not dropped
    assert "| model failures | 1 |" in (out / "results.md").read_text()
    again = Scripted()
    res = evaluate_with_predictor(again, records, out, num_frames=2, progress=False, print_table=False)
    assert again.calls == ["syn-3"] and res["counts"]["model_failures"] == 0
    assert res["accuracy"] == pytest.approx(2 / 6)


def test_a_batch_that_raises_is_answered_one_question_at_a_time(synth, tmp_path):
    predictor = FailsOn("syn-1")
    res = evaluate_with_predictor(predictor, load_benchmark("synthetic", synth), tmp_path / "out", num_frames=2,
                                  progress=False, print_table=False, batch_size=3)
    assert predictor.batches == [["syn-0", "syn-1", "syn-2"], ["syn-3", "syn-4", "syn-5"]]
    assert predictor.calls == ["syn-0", "syn-2", "syn-3", "syn-4", "syn-5"]  # syn-1 alone failed
    rows = {r["id"]: r for r in _lines(tmp_path / "out" / "predictions.jsonl")}
    assert [rows[f"syn-{i}"]["status"] for i in range(3)] == ["answered", "model_error", "unparsed"]
    assert res["counts"]["model_failures"] == 1 and res["counts"]["answered"] == 3


def test_a_model_that_fails_on_every_question_stops_the_run(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    with pytest.raises(StormError, match=r"failed on each of the first 5 questions .*out of memory on syn-4"):
        evaluate_with_predictor(FailsOn("*"), records, out, num_frames=2, progress=False, print_table=False)
    assert [r["status"] for r in _lines(out / "predictions.jsonl")] == ["model_error"] * 5  # not syn-5
    fixed = Scripted()
    res = evaluate_with_predictor(fixed, records, out, num_frames=2, progress=False, print_table=False)
    assert fixed.calls == [f"syn-{i}" for i in range(6)] and res["counts"]["model_failures"] == 0


def test_rerun_skips_done_ids_and_drops_a_truncated_last_line(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    evaluate_with_predictor(Scripted(), records, out, num_frames=2, limit=3, progress=False, print_table=False)
    pred = out / "predictions.jsonl"
    with open(pred, "a") as f:  # a run killed in the middle of writing syn-3's line
        f.write('{"id": "syn-3", "status": "answ')
    second = Scripted()
    res = evaluate_with_predictor(second, records, out, num_frames=2, progress=False, print_table=False)
    assert second.calls == ["syn-3", "syn-4", "syn-5"]
    ids = [r["id"] for r in _lines(pred)]
    assert ids == [f"syn-{i}" for i in range(6)]
    assert res["counts"]["predicted"] == 6 and res["counts"]["missing"] == 0


def test_a_damaged_middle_line_is_an_error_not_a_guess(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    evaluate_with_predictor(Scripted(), records, out, num_frames=2, limit=2, progress=False, print_table=False)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    with pytest.raises(StormError, match=r"predictions.jsonl, line 1: not a prediction record"):
        evaluate_with_predictor(Scripted(), records, out, num_frames=2, progress=False, print_table=False)


def test_other_settings_in_the_same_folder_are_refused(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    evaluate_with_predictor(Scripted(), records, out, num_frames=2, limit=1, progress=False, print_table=False)
    with pytest.raises(StormError, match="num_frames: 2 before, 4 now"):
        evaluate_with_predictor(Scripted(), records, out, num_frames=4, progress=False, print_table=False)


class Slow(Scripted):
    def predict(self, record, frames):
        time.sleep(0.25)
        return super().predict(record, frames)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_run_resumes_without_lost_or_duplicated_predictions(synth, tmp_path):
    """A real SIGKILL in the middle of a run (a forked child, so no second interpreter start-up)."""
    out = tmp_path / "out"
    records = load_benchmark("synthetic", synth)
    pid = os.fork()
    if pid == 0:  # the child: run until killed (no video decoding: FFmpeg's threads do not survive fork)
        try:
            evaluate_with_predictor(Slow(), records, out, num_frames=2, progress=False, print_table=False,
                                    frame_loader=lambda r: np.zeros((2, 8, 8, 3), np.uint8))
        finally:
            os._exit(0)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 30
    while time.time() < deadline:
        if pred.exists() and pred.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the child finished before it was killed"
    before = [json.loads(x)["id"] for x in pred.read_text().splitlines() if x.strip().endswith("}")]
    assert 2 <= len(before) < 6 and not (out / "results.json").exists()
    again = Scripted()
    res = evaluate_with_predictor(again, records, out, num_frames=2, progress=False, print_table=False)
    ids = [r["id"] for r in _lines(pred)]
    assert sorted(ids) == [f"syn-{i}" for i in range(6)] and len(ids) == len(set(ids))
    assert set(again.calls).isdisjoint(before) and len(again.calls) == 6 - len(before)
    assert res["counts"]["predicted"] == 6


def test_ranks_take_disjoint_shards_and_rank0_merges(synth, tmp_path):
    records = load_benchmark("synthetic", synth)
    out = tmp_path / "out"
    p0, p1 = Scripted(), Scripted()
    run_predictions(records, p0, out, frame_loader=lambda r: load_record_frames(r, 2), rank=0, world_size=2,
                    progress=False)
    run_predictions(records, p1, out, frame_loader=lambda r: load_record_frames(r, 2), rank=1, world_size=2,
                    progress=False)
    assert p0.calls == ["syn-0", "syn-2", "syn-4"] and p1.calls == ["syn-1", "syn-3", "syn-5"]
    assert [r["id"] for r in _lines(out / "predictions.rank1.jsonl")] == p1.calls
    res = finalize("synthetic", records, out, {"benchmark": "synthetic"}, print_table=False)
    assert [r["id"] for r in _lines(out / "predictions.jsonl")] == [f"syn-{i}" for i in range(6)]
    assert not list(out.glob("predictions.rank*.jsonl"))
    assert res["counts"]["predicted"] == 6 and res["counts"]["correct"] == 2
    # a later single-process rerun finds everything done
    third = Scripted()
    run_predictions(records, third, out, frame_loader=lambda r: load_record_frames(r, 2), progress=False)
    assert third.calls == []


def _rec(i, task, answer, bench):
    return Record(id=f"{task}-{i}", benchmark=bench, video="v", question="q", options=("a", "b", "c"),
                  answer=answer, categories={"task": task, "question_type": task})


@pytest.mark.parametrize("bench,key", [("mvbench", "mean_over_task"), ("mlvu", "mean_over_question_type")])
def test_mean_over_tasks_is_the_headline_for_mvbench_and_mlvu(bench, key):
    recs = [_rec(i, "t1", 0, bench) for i in range(4)] + [_rec(i, "t2", 0, bench) for i in range(2)]
    preds = {r.id: {"id": r.id, "status": "answered", "correct": r.id in ("t1-0", "t2-0", "t2-1"),
                    "pred": 0 if r.id in ("t1-0", "t2-0", "t2-1") else 1,
                    "pred_letter": "A" if r.id in ("t1-0", "t2-0", "t2-1") else "B",
                    "reply": "A" if r.id in ("t1-0", "t2-0", "t2-1") else "B"} for r in recs}
    res = score(bench, recs, preds)
    assert res["accuracy"] == pytest.approx(3 / 6)
    assert res[key] == pytest.approx((1 / 4 + 2 / 2) / 2)
    assert res["headline"]["value"] == res[key]


def test_frame_folders_respect_bounds_at_their_frame_rate(tmp_path):
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    rec = next(r for r in load_benchmark("mvbench", root) if r.id == "episodic_reasoning/0")
    frames = load_record_frames(rec, 4)
    assert frames.shape == (4, 24, 24, 3)
    # 1 s .. 2 s at 3 fps is MVBench's frames 3..6 (00001.jpg is frame 1): images 00003..00006 (grey 60..120)
    assert np.allclose(frames[:, 12, 12, 0], [60, 80, 100, 120], atol=6)
    assert LETTERS[rec.answer] == "C"


def test_a_videos_questions_go_to_one_rank_together_and_decode_once():
    from storm_vlm.eval.runner import last_clip_memo, shard
    from storm_vlm.video import VideoDecodeError

    recs = [Record(id=f"q{i}", benchmark="synthetic", video=v, question="q", options=("a", "b"), answer=0)
            for i, v in enumerate("abacb")]
    assert [r.id for r in shard(recs, 0, 2)] == ["q0", "q2", "q3"]  # videos a and c, a's questions together
    assert [r.id for r in shard(recs, 1, 2)] == ["q1", "q4"]
    assert [r.id for r in shard(recs, 0, 1)] == ["q0", "q2", "q1", "q4", "q3"]
    calls = []

    def loader(record):
        calls.append(record.video)
        if record.video == "c":
            raise VideoDecodeError("c: broken")
        return np.full((1, 2, 2, 3), ord(record.video), np.uint8)

    load = last_clip_memo(loader)
    a0, a2, b = load(recs[0]), load(recs[2]), load(recs[1])
    assert a0 is a2 and b[0, 0, 0, 0] == ord("b") and calls == ["a", "b"]
    for _ in range(2):
        with pytest.raises(VideoDecodeError, match="c: broken"):
            load(recs[3])
    assert calls == ["a", "b", "c"]  # the failure is remembered for the clip's other questions
