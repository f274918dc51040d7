"""The readers against variants of the benchmarks' files as users have them: MLVU-Test as MLVU/MLVU_Test
publishes it, counting questions whose candidates are JSON numbers, MVBench's converted and nested video
names, answerless test splits, and hostile files (empty or unresolvable video names, oversized or
wrongly typed annotation files), each one clear error naming the file and the cause, never a traceback."""

import json

import pandas as pd
import pytest

from storm_vlm.eval import load_benchmark, readers
from storm_vlm.eval.readers import BenchmarkFormatError

from test_eval_fixtures import _dump
from test_eval_hub_layouts import _touch

MLVU_TEST_GT = [
    # MLVU/MLVU_Test's test-ground-truth/test_mcq_gt.json: six candidates, the answer as text
    {"video": "test_surveil_27.mp4", "duration": 297.57, "question": "Is there anything unusual?",
     "candidates": ["Fighting", "Shoplifting", "Arrest", "Normal", "Shooting", "Vandalism"],
     "answer": "Shoplifting", "question_type": "anomaly_reco", "question_id": "AR_0"},
    {"video": "test_count_3.mp4", "duration": 420.0, "question": "How many times does the dog jump?",
     "candidates": [2, 4, 5, 1, 3, 6], "answer": 3, "question_type": "count", "question_id": "AC_0"},
]


def test_mlvu_reads_the_official_test_ground_truth(tmp_path):
    _dump(tmp_path / "test-ground-truth" / "test_mcq_gt.json", MLVU_TEST_GT)
    _dump(tmp_path / "test_multi_choice_tasks.json", [{k: v for k, v in r.items() if k != "answer"}
                                                      for r in MLVU_TEST_GT])
    _touch(tmp_path / "MLVU_Test" / "video" / "test_surveil_27.mp4")  # where test_video.tar.gz extracts
    recs = load_benchmark("mlvu", tmp_path)
    assert [(r.id, r.answer, r.answer_letter) for r in recs] == [("AR_0", 1, "B"), ("AC_0", 4, "E")]
    assert recs[0].video == str((tmp_path / "MLVU_Test" / "video" / "test_surveil_27.mp4").resolve())
    assert recs[1].video.endswith("MLVU_Test/video/test_count_3.mp4")  # not extracted: a decode failure
    assert recs[1].options == ("2", "4", "5", "1", "3", "6")
    assert recs[0].categories == {"question_type": "anomaly_reco"} and len(recs[0].options) == 6


def test_mlvu_test_questions_without_answers_say_where_the_answers_are(tmp_path):
    _dump(tmp_path / "test_multi_choice_tasks.json", [{k: v for k, v in MLVU_TEST_GT[0].items() if k != "answer"}])
    with pytest.raises(BenchmarkFormatError, match=r"test_mcq_gt\.json: file not found: test_multi_choice_tasks"
                                                   r"\.json beside it holds MLVU-Test's questions without answers"):
        load_benchmark("mlvu", tmp_path)


def test_integer_candidates_and_answers_are_read_as_their_text(tmp_path):
    """The benchmarks' own readers compare candidates and answer as text; a counting question stored
    with JSON numbers is a question, not a malformed record."""
    _dump(tmp_path / "json" / "action_count.json", [
        {"video": "video_1.mp4", "question": "How many times?", "candidates": [3, 2, 4], "answer": 2},
        {"video": "video_2.mp4", "question": "How many times?", "candidates": ["3", "2", "4"], "answer": 4}])
    recs = load_benchmark("mvbench", tmp_path)
    assert [(r.options, r.answer) for r in recs] == [(("3", "2", "4"), 1), (("3", "2", "4"), 2)]
    _dump(tmp_path / "json" / "action_count.json", [
        {"video": "video_1.mp4", "question": "How many?", "candidates": [3, True], "answer": 3}])
    with pytest.raises(BenchmarkFormatError, match=r"action_count\.json, record 0: option 1 of 'candidates' is "
                                                   r"not a non-empty string: True"):
        load_benchmark("mvbench", tmp_path)


@pytest.mark.parametrize("task, name, stored", [
    ("action_antonym", "123.webm", "ssv2_video_mp4/123.mp4"),  # lmms-eval's converted copy
    ("fine_grained_pose", "S001C001P001R001A001_rgb.avi", "nturgbd/S001C001P001R001A001_rgb.avi"),
    ("fine_grained_pose", "S001C001P001R001A001_rgb.avi", "nturgbd_convert/S001C001P001R001A001_rgb.mp4"),
    ("fine_grained_action", "yawning/flickr-3-2-4.mp4", "Moments_in_Time_Raw/videos/yawning/flickr-3-2-4.mp4"),
])
def test_mvbench_finds_converted_and_nested_videos(tmp_path, task, name, stored):
    _dump(tmp_path / "json" / f"{task}.json", [{"video": name, "question": "q", "candidates": ["x", "y"],
                                               "answer": "y"}])
    _touch(tmp_path / "video" / stored)
    (r,) = load_benchmark("mvbench", tmp_path)
    assert r.video == str((tmp_path / "video" / stored).resolve()) and r.answer == 1


def test_answerless_splits_are_explained_not_just_missing(tmp_path):
    q = {"q_uid": "u1", "question": "What is c doing?"}
    q.update({f"option {k}": f"o{k}" for k in range(5)})
    _dump(tmp_path / "ego" / "questions.json", [q])
    with pytest.raises(BenchmarkFormatError, match=r"subset_answers\.json: file not found \(the answers of the "
                                                   r"500-question subset; questions\.json alone has no answers"):
        load_benchmark("egoschema", tmp_path / "ego")
    _dump(tmp_path / "lvb" / "lvb_test_wo_gt.json", [{"id": "a_0", "video_path": "a.mp4", "question": "q",
                                                       "candidates": ["x", "y"]}])
    with pytest.raises(BenchmarkFormatError, match=r"lvb_val\.json: file not found .*lvb_test_wo_gt\.json or "
                                                   r"test-\*\.parquet, has no answers"):
        load_benchmark("longvideobench", tmp_path / "lvb")


def _one_record(name: str, root, video: str) -> str:
    """Write a one-question benchmark `name` under `root` whose video field is `video`; the annotation file."""
    if name == "mvbench":
        _dump(root / "json" / "object_shuffle.json", [{"video": video, "question": "q", "candidates": ["x", "y"],
                                                      "answer": "x"}])
        return "object_shuffle.json, record 0"
    if name == "mlvu":
        _dump(root / "json" / "4_count.json", [{"video": video, "question": "q", "candidates": ["1", "2"],
                                               "answer": "1", "question_type": "count"}])
        return "4_count.json, record 0"
    if name == "longvideobench":
        _dump(root / "lvb_val.json", [{"id": "a_0", "video_path": video, "question": "q", "candidates": ["x", "y"],
                                       "correct_choice": 0, "duration_group": 15, "question_category": "S2E"}])
        return "lvb_val.json, record 0 (id 'a_0')"
    if name == "synthetic":
        _dump(root / "test.json", [{"id": "s0", "video": video, "question": "q", "options": ["A. x", "B. y"],
                                    "answer": "A", "task": "t"}])
        return "test.json, record 0 (id 's0')"
    root.joinpath("videomme").mkdir(parents=True)
    pd.DataFrame([{"videoID": video, "question_id": "001-1", "duration": "short", "domain": "d", "sub_category": "s",
                   "task_type": "t", "question": "q", "options": ["A. x", "B. y"], "answer": "A"}]).to_parquet(
        root / "videomme" / "test-00000-of-00001.parquet")
    return "parquet, record 0 (question_id '001-1')"


@pytest.mark.parametrize("name", ["mvbench", "mlvu", "longvideobench", "synthetic", "videomme"])
def test_an_empty_video_name_is_a_malformed_record(tmp_path, name):
    """An empty name would make the video the task's video folder itself (MVBench: a ValueError traceback)."""
    where = _one_record(name, tmp_path, "")
    key = {"longvideobench": "video_path", "videomme": "videoID"}.get(name, "video")
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(name, tmp_path)
    assert f"{where}: field {key!r} is empty" in str(info.value)


def test_an_mvbench_video_named_by_the_root_folder_is_refused_not_a_traceback(tmp_path):
    _one_record("mvbench", tmp_path, "/")
    with pytest.raises(BenchmarkFormatError, match=r"object_shuffle\.json, record 0: video path '/' .*outside the "
                                                   r"data root"):
        load_benchmark("mvbench", tmp_path)


@pytest.mark.parametrize("name", ["mvbench", "egoschema"])
def test_a_video_name_too_long_to_look_up_is_a_missing_video(tmp_path, name):
    """Looking a 300-character name up fails (ENAMETOOLONG, as a folder without permission would): the record
    is kept with the video where the release puts it, and the run records the decode failure."""
    long = "v" * 300
    if name == "mvbench":
        _one_record("mvbench", tmp_path, long + ".mp4")
        (tmp_path / "video" / "perception" / "videos").mkdir(parents=True)
        expected = tmp_path / "video" / "perception" / "videos" / f"{long}.mp4"
    else:
        q = {"q_uid": long, "question": "What is c doing?"}
        q.update({f"option {k}": f"o{k}" for k in range(5)})
        _dump(tmp_path / "questions.json", [q])
        _dump(tmp_path / "subset_answers.json", {long: 2})
        expected = tmp_path / "videos" / f"{long}.mp4"
    (r,) = load_benchmark(name, tmp_path)
    assert r.video == str(expected.resolve())


@pytest.mark.parametrize("name, file", [("longvideobench", "lvb_val.json"), ("videomme", "parquet")])
def test_an_oversized_annotation_file_is_refused_before_it_is_read(tmp_path, monkeypatch, name, file):
    _one_record(name, tmp_path, "a.mp4")
    monkeypatch.setattr(readers, "MAX_ANNOTATION_BYTES", 64)
    with pytest.raises(BenchmarkFormatError, match=rf"{file}: \d+ bytes, larger than the 64 an annotation file may"):
        load_benchmark(name, tmp_path)


@pytest.mark.parametrize("name, file, content, cause", [
    ("mvbench", "json/object_shuffle.json", {"video": "a.mp4"}, "expected a JSON list of records, got dict"),
    ("mlvu", "json/4_count.json", ["a.mp4"], "record 0: expected an object, got str"),
    ("longvideobench", "lvb_val.json", {"a_0": {}}, "expected a JSON list of records, got dict"),
    ("egoschema", "subset_answers.json", [["u1", 2]], "expected a JSON object {q_uid: answer index}, got list"),
])
def test_a_wrongly_typed_annotation_file_names_the_file_and_the_type(tmp_path, name, file, content, cause):
    if name == "egoschema":
        _dump(tmp_path / "questions.json", [])
    _dump(tmp_path / file, content)
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(name, tmp_path)
    assert f"{tmp_path / file}" in str(info.value) and cause in str(info.value)


def test_a_utf16_annotation_file_is_one_error(tmp_path):
    """A JSON file saved as "Unicode" (UTF-16) by a Windows editor."""
    (tmp_path / "lvb_val.json").write_bytes(json.dumps([{"id": "a"}]).encode("utf-16"))
    with pytest.raises(BenchmarkFormatError, match=r"lvb_val\.json: not valid JSON \('utf-8' codec"):
        load_benchmark("longvideobench", tmp_path)
