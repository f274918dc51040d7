"""The benchmarks as a Hugging Face Hub download leaves them (`huggingface-cli download --repo-type dataset
REPO --local-dir DATA_ROOT`, video archives extracted in place), and MVBench's TVQA frames read over the
frames MVBench's own code reads.

File names, columns and answer encodings follow the Hub repositories lmms-eval reads: lmms-lab/egoschema
(Subset/), sy1998/MLVU_dev (mlvu/) and sy1998/MLVU_Test (mlvu_test/), longvideobench/LongVideoBench
(validation-*.parquet)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storm_vlm.eval import evaluate_with_predictor, load_benchmark
from storm_vlm.eval.frames import load_record_frames
from storm_vlm.eval.readers import BenchmarkFormatError

from test_eval_fixtures import Videos, _dump, make_mvbench


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def _touch(path: Path) -> None:  # the readers locate videos; they never open them
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _egoschema_row(k: int, answer) -> dict:
    return {"question_idx": str(k), "question": f"What is c doing {k}?", "video_idx": f"uid-{k}",
            "option": [f"{'ABCDE'[i]}. activity {i} of {k}" for i in range(5)], "answer": answer}


def test_egoschema_reads_the_hub_subset_and_only_it(tmp_path):
    """lmms-lab/egoschema: Subset/ holds the 500 answered questions (answer an index, stored as a string);
    MC/ and GENERATION/ hold all 5031 with no answer and are never read."""
    _parquet(tmp_path / "Subset" / "test-00000-of-00001.parquet", [_egoschema_row(0, "3"), _egoschema_row(1, "0")])
    _parquet(tmp_path / "MC" / "test-00000-of-00001.parquet", [_egoschema_row(k, None) for k in range(3)])
    _touch(tmp_path / "videos" / "uid-0.mp4")
    recs = load_benchmark("egoschema", tmp_path)
    assert [(r.id, r.answer) for r in recs] == [("uid-0", 3), ("uid-1", 0)]
    assert recs[0].options == tuple(f"activity {i} of 0" for i in range(5))
    assert recs[0].video == str((tmp_path / "videos" / "uid-0.mp4").resolve())
    assert recs[1].video.endswith("videos/uid-1.mp4")  # not extracted yet: a decode failure in the run


def test_egoschema_hub_bad_answer_and_nothing_found_are_clear_errors(tmp_path):
    _parquet(tmp_path / "Subset" / "test-00000-of-00001.parquet", [_egoschema_row(0, "3"), _egoschema_row(1, "7")])
    with pytest.raises(BenchmarkFormatError, match=r"test-00000-of-00001\.parquet, record 1 \(video_idx 'uid-1'\): "
                                                   r"answer 7 is not an index 0\.\.4"):
        load_benchmark("egoschema", tmp_path)
    with pytest.raises(BenchmarkFormatError, match=r"questions\.json: file not found.*Subset/test-\*\.parquet"):
        load_benchmark("egoschema", tmp_path / "Subset")


MLVU_DEV_ROWS = [
    # sy1998/MLVU_dev's columns; the question repeats its options for lmms-eval's "Best option: (" prompt
    {"video_name": "movie101_66.mp4", "duration": 400.0,
     "question": "Who rescues the boy?\n(A) The dog\n(B) The teacher\n(C) His sister\n(D) A stranger",
     "candidates": ["The dog", "The teacher", "His sister", "A stranger"], "answer": "C",
     "task_type": "plotQA", "question_id": "plotQA_0"},
    {"video_name": "count_12.mp4", "duration": 300.0, "question": "How many times does he jump?\n(A) 1\n(B) 2\n(C) 3",
     "candidates": ["1", "2", "3"], "answer": "A", "task_type": "count", "question_id": "count_0"},
    {"video_name": "count_13.mp4", "duration": 300.0, "question": "Which comes last?\n(A) run\n(B) sit",
     "candidates": ["run", "sit"], "answer": "B", "task_type": "count", "question_id": "count_1"},
]


class Right:
    def predict(self, record, frames):
        return f"({record.answer_letter})"


def test_mlvu_reads_the_hub_dev_parquet_and_scores_by_task_type(tmp_path):
    _parquet(tmp_path / "mlvu" / "test-00000-of-00001.parquet", MLVU_DEV_ROWS)
    for row in MLVU_DEV_ROWS:
        _touch(tmp_path / row["video_name"])  # where video_part_*.zip / action_count.zip extract
    recs = load_benchmark("mlvu", tmp_path)
    assert [r.id for r in recs] == ["plotQA/0", "count/0", "count/1"]
    r = recs[0]
    assert r.question == "Who rescues the boy?"  # asked once, in the shared prompt
    assert r.options == ("The dog", "The teacher", "His sister", "A stranger") and r.answer == 2
    assert r.video == str((tmp_path / "movie101_66.mp4").resolve()) and r.categories == {"question_type": "plotQA"}
    res = evaluate_with_predictor(Right(), recs, tmp_path / "out", progress=False, print_table=False,
                                  frame_loader=lambda rec: np.zeros((2, 8, 8, 3), np.uint8))
    assert res["accuracy"] == 1.0 and res["headline"]["value"] == 1.0


def test_mlvu_reads_the_hub_test_parquet_with_six_options(tmp_path):
    row = {"video_name": "sports_1.mp4", "question": "Who scores?", "answer": "F", "task_type": "sportsQA",
           "candidates": ["a", "b", "c", "d", "e", "f"]}
    _parquet(tmp_path / "mlvu_test" / "test-00000-of-00001.parquet", [row])
    (r,) = load_benchmark("mlvu", tmp_path)
    assert (r.id, r.question, r.answer, len(r.options)) == ("sportsQA/0", "Who scores?", 5, 6)


def test_mlvu_hub_errors_name_the_file_and_record(tmp_path):
    rows = [dict(MLVU_DEV_ROWS[0]), dict(MLVU_DEV_ROWS[1], answer="D")]  # 3 candidates: A-C
    _parquet(tmp_path / "mlvu" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkFormatError, match=r"test-00000-of-00001\.parquet, record 1: answer 'D' is not one "
                                                   r"of the letters A-C"):
        load_benchmark("mlvu", tmp_path)
    _parquet(tmp_path / "mlvu" / "test-00000-of-00001.parquet", [{k: v for k, v in MLVU_DEV_ROWS[0].items()
                                                                  if k != "answer"}])
    with pytest.raises(BenchmarkFormatError, match=r"missing columns \['answer'\]"):
        load_benchmark("mlvu", tmp_path)
    _parquet(tmp_path / "mlvu_test" / "test-00000-of-00001.parquet", [MLVU_DEV_ROWS[0]])
    with pytest.raises(BenchmarkFormatError, match="holds both mlvu/ .* and mlvu_test/"):
        load_benchmark("mlvu", tmp_path)
    with pytest.raises(BenchmarkFormatError, match=r"1_plotQA\.json: file not found .*sy1998/MLVU_dev"):
        load_benchmark("mlvu", tmp_path / "mlvu")


def _lvb_row(k: int, correct, options: list[str]) -> dict:
    # longvideobench/LongVideoBench's parquet columns: option0..option4, "N/A" where a question has fewer
    row = {"video_id": f"vid{k}", "id": f"vid{k}_0", "video_path": f"vid{k}.mp4", "subtitle_path": f"vid{k}_en.json",
           "correct_choice": correct, "question": f"What happens in clip {k}?", "duration": 500.0,
           "duration_group": 600, "question_category": "E3E", "topic_category": "NP-News-Programs",
           "starting_timestamp_for_subtitles": 0.0}
    row.update({f"option{i}": (options[i] if i < len(options) else "N/A") for i in range(5)})
    return row


def test_longvideobench_reads_the_hub_validation_parquet_not_the_test_split(tmp_path):
    _parquet(tmp_path / "validation-00000-of-00001.parquet",
             [_lvb_row(0, 1, ["A cup", "A book", "A phone", "A pen"]), _lvb_row(1, 4, list("vwxyz"))])
    _parquet(tmp_path / "test-00000-of-00001.parquet", [_lvb_row(9, -1, ["p", "q"])])  # no ground truth
    recs = load_benchmark("longvideobench", tmp_path)
    assert [(r.id, r.answer) for r in recs] == [("vid0_0", 1), ("vid1_0", 4)]
    assert recs[0].options == ("A cup", "A book", "A phone", "A pen")  # the "N/A" option5 is not an option
    assert recs[0].categories == {"duration_group": "600", "question_category": "E3E"}
    assert recs[0].video == str((tmp_path / "videos" / "vid0.mp4").resolve())
    _parquet(tmp_path / "validation-00000-of-00001.parquet", [_lvb_row(0, 4, ["A cup", "A book"])])
    with pytest.raises(BenchmarkFormatError, match=r"validation-00000-of-00001\.parquet, record 0 \(id 'vid0_0'\): "
                                                   r"correct_choice 4 is outside 0\.\.1"):
        load_benchmark("longvideobench", tmp_path)
    (tmp_path / "validation-00000-of-00001.parquet").unlink()
    with pytest.raises(BenchmarkFormatError, match=r"lvb_val\.json: file not found \(nor the Hub's validation"):
        load_benchmark("longvideobench", tmp_path)


@pytest.mark.parametrize("start,end", [(1.0, 2.0), (0.5, 1.5), (0.0, 0.9), (1.0, 1.1), (2.0, 10.0)])
def test_tvqa_frames_are_the_frames_mvbench_reads(tmp_path, start, end):
    """MVBench's reader numbers TVQA frames from 1 (00001.jpg is frame 1) and reads frames round(start * 3)
    .. round(end * 3) (at least 1, at most the last): those images, no later ones. The fixture's image
    0000n.jpg is a flat grey of level 20 * n."""
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    _dump(root / "json" / "episodic_reasoning.json", [
        {"video": "s01e01_seg01_clip_00", "question": "Why?", "candidates": ["a", "b"], "answer": "a",
         "start": start, "end": end}])
    rec = next(r for r in load_benchmark("mvbench", root) if r.id == "episodic_reasoning/0")
    first, last = max(1, round(start * 3)), min(round(end * 3), 9)
    frames = load_record_frames(rec, last - first + 1)
    assert np.allclose(frames[:, 12, 12, 0], [20 * n for n in range(first, last + 1)], atol=6)


@pytest.mark.parametrize("name", ["mlvu", "egoschema", "longvideobench"])
def test_hub_video_paths_stay_inside_the_data_root(tmp_path, name):
    if name == "mlvu":
        _parquet(tmp_path / "mlvu" / "test-0.parquet", [dict(MLVU_DEV_ROWS[0], video_name="../../secret.mp4")])
    elif name == "egoschema":
        _parquet(tmp_path / "Subset" / "test-0.parquet", [dict(_egoschema_row(0, "1"), video_idx="../../secret")])
    else:
        _parquet(tmp_path / "validation-0.parquet", [dict(_lvb_row(0, 0, ["a", "b"]), video_path="../../secret.mp4")])
    with pytest.raises(BenchmarkFormatError, match=r"\.parquet, record 0.*outside the data root"):
        load_benchmark(name, tmp_path)
