"""The benchmarks as their public releases ship them, beyond the one-file layouts of test_eval_fixtures:
a split stored as several parquet shards, and a task whose video folder was never unzipped."""

import json

import numpy as np
import pandas as pd
import pytest

from storm_vlm.eval import evaluate_with_predictor, load_benchmark
from storm_vlm.eval.readers import BenchmarkFormatError

from test_eval_fixtures import Videos, make_mvbench

VIDEOMME_ROWS = [
    # video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question, options, answer:
    # the column order and value shapes of lmms-lab/Video-MME's videomme/test-*.parquet
    ("001", "short", "Knowledge", "Humanity & History", "https://www.youtube.com/watch?v=fFjv93ACGo8", "fFjv93ACGo8",
     "001-1", "Counting Problem", "When demonstrating the Germany modern Christmas tree, how many colors are used?",
     ["A. Four.", "B. Three.", "C. Two.", "D. Five."], "C"),
    ("001", "short", "Knowledge", "Humanity & History", "https://www.youtube.com/watch?v=fFjv93ACGo8", "fFjv93ACGo8",
     "001-2", "Information Synopsis", "What is the genre of this video?",
     ["A. It is a news report.", "B. It is a documentary.", "C. It is a vlog.", "D. It is a cartoon."], "B"),
    ("601", "long", "Life Record", "Travel", "https://www.youtube.com/watch?v=abcdefghijk", "abcdefghijk",
     "601-1", "Temporal Reasoning", "What do they do after the hike?",
     ["A. Swim.", "B. Eat.", "C. Sleep.", "D. Drive."], "A"),
]
VIDEOMME_COLUMNS = ["video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
                    "question", "options", "answer"]


def _write_shards(folder, rows, shards):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = pd.DataFrame([dict(zip(VIDEOMME_COLUMNS, r)) for r in rows[k::shards]])
        part.to_parquet(folder / f"test-{k:05d}-of-{shards:05d}.parquet")


def test_videomme_reads_every_shard_of_a_sharded_split(tmp_path):
    """A split the Hub stores as test-00000-of-00002 + test-00001-of-00002 is read whole: reading only
    the first shard would silently score half the benchmark."""
    _write_shards(tmp_path / "videomme", VIDEOMME_ROWS, shards=2)
    records = load_benchmark("videomme", tmp_path)
    assert sorted(r.id for r in records) == ["001-1", "001-2", "601-1"]
    by_id = {r.id: r for r in records}
    assert by_id["001-2"].options[1] == "It is a documentary." and by_id["001-2"].answer == 1
    assert by_id["601-1"].categories["duration"] == "long" and by_id["601-1"].video.endswith("data/abcdefghijk.mp4")


def test_a_bad_record_in_a_later_shard_names_that_shard(tmp_path):
    rows = [list(r) for r in VIDEOMME_ROWS]
    rows[1][-1] = "E"  # 001-2, which lands in the second shard
    _write_shards(tmp_path / "videomme", rows, shards=2)
    with pytest.raises(BenchmarkFormatError, match=r"test-00001-of-00002\.parquet, record 0 \(question_id '001-2'\)"):
        load_benchmark("videomme", tmp_path)


class Right:
    """Always names the right letter."""

    def predict(self, record, frames):
        return f"The answer is {record.answer_letter}."


def test_a_task_whose_videos_all_fail_to_decode_is_named_not_silently_dropped(tmp_path, caplog):
    """MVBench ships each source as its own zip under video/; one left unzipped makes every question
    of its task a decode failure. The mean over tasks then covers fewer tasks: that is said (warning,
    results.json, results.md) and mean_over_task_all counts the task's questions wrong."""
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    for f in (root / "video" / "perception" / "videos").iterdir():  # object_shuffle's folder, never unzipped
        f.unlink()
    records = load_benchmark("mvbench", root)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="storm_vlm.eval"):
        res = evaluate_with_predictor(Right(), records, out, num_frames=2, progress=False, print_table=False)
    assert res["counts"]["decode_failures"] == 1 and res["decode_failure_ids"] == ["object_shuffle/0"]
    assert res["mean_over_task"] == 1.0  # action_sequence and episodic_reasoning, all right
    assert res["mean_over_task_all"] == pytest.approx(2 / 3)  # object_shuffle counted wrong
    assert res["headline"] == {"name": "mean accuracy over tasks", "value": 1.0,
                               "groups_without_answers": ["object_shuffle"]}
    assert "'object_shuffle' failed to decode" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    assert saved["mean_over_task_all"] == res["mean_over_task_all"]
    table = (out / "results.md").read_text()
    assert "| mean accuracy over tasks (decode failures as wrong) | 66.67 |" in table
    assert "| task with every video undecodable (left out of the mean) | object_shuffle |" in table


def test_nothing_left_out_when_every_task_has_an_answer(tmp_path):
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    records = load_benchmark("mvbench", root)
    loader = lambda r: np.zeros((2, 8, 8, 3), np.uint8)  # noqa: E731
    res = evaluate_with_predictor(Right(), records, tmp_path / "out", frame_loader=loader, progress=False,
                                  print_table=False)
    assert res["mean_over_task"] == res["mean_over_task_all"] == 1.0
    assert res["headline"]["groups_without_answers"] == []
    assert "undecodable" not in (tmp_path / "out" / "results.md").read_text()
