"""Tiny fixture folders in each benchmark's public layout, and the readers reading them.

The `make_*` builders are imported by the other test_eval_* modules.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_mp4 as encode_mp4
from PIL import Image

from storm_vlm.errors import StormError
from storm_vlm.eval import load_benchmark
from storm_vlm.eval.readers import BenchmarkFormatError


def write_mp4(path: Path, num_frames: int = 6, size: int = 32, fps: int = 6) -> Path:
    """A small mpeg4 video whose frame i is a flat grey of level 40 * i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([np.full((size, size, 3), (40 * i) % 256, dtype=np.uint8) for i in range(num_frames)])
    return encode_mp4(path, frames, fps, "mpeg4")


class Videos:
    """Copies one small mp4 wherever a fixture needs a video (encoding once is cheaper)."""

    def __init__(self, tmp: Path):
        self.master = write_mp4(tmp / "_master.mp4")

    def put(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.master, path)
        return path


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def make_videomme(root: Path, videos: Videos) -> Path:
    rows = [
        ("v1", "001-1", "short", "Knowledge", "Astronomy", "Counting Problem", "How many stars?",
         ["A. One.", "B. Two.", "C. Three.", "D. Four."], "B"),
        ("v1", "001-2", "short", "Knowledge", "Astronomy", "OCR Problems", "What is written?",
         ["A. Moon.", "B. Sun.", "C. Mars.", "D. Venus."], "A"),
        ("v2", "002-1", "medium", "Sports Competition", "Football", "Action Recognition", "What happens?",
         ["A. A goal.", "B. A foul.", "C. A save.", "D. A pass."], "D"),
        ("v3", "003-1", "long", "Sports Competition", "Basketball", "Counting Problem", "How many shots?",
         ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "C"),
    ]
    cols = ["videoID", "question_id", "duration", "domain", "sub_category", "task_type", "question", "options", "answer"]
    df = pd.DataFrame([dict(zip(cols, r)) for r in rows])
    df.insert(0, "video_id", ["001", "001", "002", "003"])
    df["url"] = "https://www.youtube.com/watch?v=x"
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    df.to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    videos.put(root / "data" / "v1.mp4")
    videos.put(root / "data" / "v2.MP4")
    videos.put(root / "data" / "v3.mkv")  # an mp4 stream under .mkv is fine for FFmpeg's probe
    return root


def make_mvbench(root: Path, videos: Videos) -> Path:
    _dump(root / "json" / "action_sequence.json", [
        {"video": "AB12.mp4", "question": "What did the person do first?", "candidates": ["Sat down.", "Opened the door."],
         "answer": "Opened the door.", "start": 0.1, "end": 0.9},
        {"video": "CD34.mp4", "question": "What did the person do last?",
         "candidates": ["Took the cup.", "Closed the box.", "Ate the food."], "answer": "Took the cup.",
         "start": 0.0, "end": 0.8},
    ])
    videos.put(root / "video" / "star" / "Charades_v1_480" / "AB12.mp4")
    videos.put(root / "video" / "star" / "Charades_v1_480" / "CD34.mp4")
    _dump(root / "json" / "object_shuffle.json", [
        {"video": "video_1.mp4", "question": "Where is the ball?", "candidates": ["Under the first cup.",
         "Under the second cup.", "Under the third cup."], "answer": "Under the third cup."},
    ])
    videos.put(root / "video" / "perception" / "videos" / "video_1.mp4")
    _dump(root / "json" / "episodic_reasoning.json", [
        {"video": "s01e01_seg01_clip_00", "question": "Why does she laugh?",
         "candidates": ["A joke.", "A fall.", "A song.", "A gift.", "A call."], "answer": "A song.",
         "start": 1.0, "end": 2.0},
    ])
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e01_seg01_clip_00"
    frames.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10):  # 3 s at 3 fps
        Image.fromarray(np.full((24, 24, 3), 20 * i, dtype=np.uint8)).save(frames / f"{i:05d}.jpg")
    return root


def make_mlvu(root: Path, videos: Videos) -> Path:
    _dump(root / "json" / "1_plotQA.json", [
        {"video": "movie_1.mp4", "duration": 400, "question": "Who rescues the boy?",
         "candidates": ["The dog", "The teacher", "His sister", "A stranger"], "answer": "His sister",
         "question_type": "plotQA"},
        {"video": "movie_1.mp4", "duration": 400, "question": "Where does it end?",
         "candidates": ["At sea", "In a city", "On a farm", "In space"], "answer": "At sea",
         "question_type": "plotQA"},
    ])
    _dump(root / "json" / "4_count.json", [
        {"video": "count_1.mp4", "duration": 300, "question": "How many times does he jump?",
         "candidates": ["1", "2", "3", "4"], "answer": "3", "question_type": "count"},
    ])
    videos.put(root / "video" / "1_plotQA" / "movie_1.mp4")
    videos.put(root / "video" / "4_count" / "count_1.mp4")
    return root


def make_longvideobench(root: Path, videos: Videos) -> Path:
    _dump(root / "lvb_val.json", [
        {"video_id": "abc", "question": "What is on the table?", "question_wo_referring_query": "x",
         "candidates": ["A cup", "A book", "A phone"], "correct_choice": 1, "position": [1],
         "topic_category": "NP-News-Programs", "question_category": "S2E", "level": "L1-Perception",
         "id": "abc_0", "video_path": "abc.mp4", "subtitle_path": "abc_en.json", "duration_group": 15,
         "starting_timestamp_for_subtitles": 0, "duration": 12.0, "view_count": 1},
        {"video_id": "def", "question": "What happens after the door opens?", "candidates": ["He leaves",
         "She sits", "They wave", "It rains", "Nothing"], "correct_choice": 4, "question_category": "E3E",
         "id": "def_0", "video_path": "def.mp4", "duration_group": 600, "duration": 500.0},
    ])
    videos.put(root / "videos" / "abc.mp4")
    videos.put(root / "videos" / "def.mp4")
    return root


def make_egoschema(root: Path, videos: Videos) -> Path:
    qs = []
    for k, uid in enumerate(["uid-a", "uid-b", "uid-c"]):
        q = {"q_uid": uid, "google_drive_id": "x", "question": f"What is c's overall goal {k}?"}
        q.update({f"option {i}": f"goal number {i} of {k}" for i in range(5)})
        qs.append(q)
    _dump(root / "questions.json", qs)
    _dump(root / "subset_answers.json", {"uid-a": 3, "uid-c": 0})
    videos.put(root / "videos" / "uid-a.mp4")
    videos.put(root / "videos" / "uid-c.mp4")
    return root


def make_synthetic(root: Path, videos: Videos, n: int = 4) -> Path:
    tasks = ["order", "count"]
    rows = []
    for i in range(n):
        rows.append({"id": f"syn-{i}", "video": f"videos/{i}.mp4", "question": f"Question {i}?",
                     "options": ["A. red", "B. green", "C. blue", "D. yellow"], "answer": "ABCD"[i % 4],
                     "task": tasks[i % 2]})
        videos.put(root / "videos" / f"{i}.mp4")
    _dump(root / "test.json", rows)
    return root


MAKERS = {"videomme": make_videomme, "mvbench": make_mvbench, "mlvu": make_mlvu,
          "longvideobench": make_longvideobench, "egoschema": make_egoschema, "synthetic": make_synthetic}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    videos = Videos(base)
    return {name: make(base / name, videos) for name, make in MAKERS.items()}


def test_videomme_reads_parquet_and_finds_each_extension(layouts):
    recs = load_benchmark("videomme", layouts["videomme"])
    assert [r.id for r in recs] == ["001-1", "001-2", "002-1", "003-1"]
    r = recs[0]
    assert r.options == ("One.", "Two.", "Three.", "Four.") and r.answer == 1 and r.answer_letter == "B"
    assert r.categories == {"duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                            "task_type": "Counting Problem"}
    assert [Path(x.video).name for x in recs] == ["v1.mp4", "v1.mp4", "v2.MP4", "v3.mkv"]
    assert recs[2].options[0] == "A goal."  # "A. A goal." loses only its own letter
    assert recs[3].answer == 2 and recs[3].categories["duration"] == "long"


def test_mvbench_uses_the_task_folder_table_bounds_and_frame_folders(layouts):
    recs = {r.id: r for r in load_benchmark("mvbench", layouts["mvbench"])}
    assert set(recs) == {"action_sequence/0", "action_sequence/1", "object_shuffle/0", "episodic_reasoning/0"}
    a = recs["action_sequence/0"]
    assert a.video.endswith("video/star/Charades_v1_480/AB12.mp4") and Path(a.video).is_file()
    assert (a.start, a.end, a.answer, a.categories) == (0.1, 0.9, 1, {"task": "action_sequence"})
    s = recs["object_shuffle/0"]
    assert s.video.endswith("perception/videos/video_1.mp4") and s.start is None and s.answer == 2
    e = recs["episodic_reasoning/0"]
    assert Path(e.video).is_dir() and e.frames_fps == 3.0
    # 1 s .. 2 s is MVBench's frames 3..6 (00003.jpg is frame 3): images 2..5 of the folder, from 0
    assert (e.start, e.end) == pytest.approx((2 / 3, 5.25 / 3))
    assert len(e.options) == 5 and e.answer == 2


def test_mvbench_falls_back_to_the_precut_segment_folders(tmp_path):
    videos = Videos(tmp_path)
    _dump(tmp_path / "mv" / "json" / "action_prediction.json", [
        {"video": "ZZ.mp4", "question": "Next?", "candidates": ["x", "y"], "answer": "y", "start": 3, "end": 5}])
    videos.put(tmp_path / "mv" / "star" / "Charades_segment" / "ZZ.mp4")
    (r,) = load_benchmark("mvbench", tmp_path / "mv")
    assert r.video.endswith("star/Charades_segment/ZZ.mp4")
    assert r.start is None and r.end is None  # already cut: never cut twice


def test_mlvu_reads_the_multiple_choice_tasks(layouts):
    recs = load_benchmark("mlvu", layouts["mlvu"])
    assert [r.id for r in recs] == ["1_plotQA/0", "1_plotQA/1", "4_count/0"]
    assert recs[0].answer == 2 and recs[0].video.endswith("video/1_plotQA/movie_1.mp4")
    assert recs[2].categories == {"question_type": "count", "task": "4_count"} and recs[2].answer == 2


def test_longvideobench_reads_lvb_val(layouts):
    recs = load_benchmark("longvideobench", layouts["longvideobench"])
    assert [r.id for r in recs] == ["abc_0", "def_0"]
    assert recs[0].options == ("A cup", "A book", "A phone") and recs[0].answer == 1
    assert recs[1].categories == {"duration_group": "600", "question_category": "E3E"} and recs[1].answer == 4
    assert recs[0].video.endswith("videos/abc.mp4")


def test_egoschema_reads_only_the_answered_subset(layouts):
    recs = load_benchmark("egoschema", layouts["egoschema"])
    assert [(r.id, r.answer) for r in recs] == [("uid-a", 3), ("uid-c", 0)]
    assert recs[0].options[4] == "goal number 4 of 0" and recs[0].video.endswith("videos/uid-a.mp4")


def test_synthetic_reads_test_json(layouts):
    recs = load_benchmark("synthetic", layouts["synthetic"])
    assert [r.answer for r in recs] == [0, 1, 2, 3]
    assert recs[1].categories == {"task": "count"} and recs[1].options == ("red", "green", "blue", "yellow")
    assert Path(recs[0].video).is_file()


@pytest.mark.parametrize("name,mutate,needle", [
    ("synthetic", lambda root: (root / "test.json").unlink(), "test.json: file not found"),
    ("synthetic", lambda root: _dump(root / "test.json", [{"id": "s0", "video": "v.mp4", "question": "q",
                                                          "options": ["A. x", "B. y"], "answer": "C", "task": "t"}]),
     "record 0 (id 's0'): answer 'C' is not one of the letters A-B"),
    ("synthetic", lambda root: _dump(root / "test.json", [{"id": "s0", "video": "v.mp4", "options": ["A. x", "B. y"],
                                                          "answer": "A", "task": "t"}]),
     "record 0 (id 's0'): missing field 'question'"),
    ("mvbench", lambda root: _dump(root / "json" / "object_shuffle.json", [{"video": "v.mp4", "question": "q",
                                                                           "candidates": ["x", "y"], "answer": "z"}]),
     "object_shuffle.json, record 0: answer 'z' is not one of the candidates"),
    ("mlvu", lambda root: (root / "json" / "4_count.json").write_text("[{", encoding="utf-8"),
     "4_count.json: not valid JSON"),
    ("longvideobench", lambda root: _dump(root / "lvb_val.json", [{"id": "q9", "video_path": "a.mp4",
                                                                  "question": "q", "candidates": ["x", "y"],
                                                                  "correct_choice": 5, "duration_group": 15,
                                                                  "question_category": "S2E"}]),
     "lvb_val.json, record 0 (id 'q9'): correct_choice 5 is outside 0..1"),
    ("egoschema", lambda root: _dump(root / "subset_answers.json", {"uid-a": 7}),
     "subset_answers.json, record q_uid 'uid-a': answer 7 is not an index 0..4"),
    ("videomme", lambda root: pd.DataFrame({"videoID": ["v"], "question": ["q"]}).to_parquet(
        root / "videomme" / "test-00000-of-00001.parquet"), "missing columns"),
])
def test_missing_files_and_malformed_records_name_the_file_and_record(tmp_path, name, mutate, needle):
    root = MAKERS[name](tmp_path / name, Videos(tmp_path))
    mutate(root)
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(name, root)
    assert needle in str(info.value) and isinstance(info.value, StormError)
    assert str(root) in str(info.value)


def test_unknown_benchmark_and_missing_root(tmp_path):
    with pytest.raises(StormError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)
    with pytest.raises(StormError, match="is not a folder"):
        load_benchmark("synthetic", tmp_path / "absent")


def test_mlvu_generation_tasks_are_skipped_with_a_warning_or_refused_alone(tmp_path, caplog):
    """MLVU's release also holds json/8_sub_scene.json and json/9_summary.json: open-ended answers (no
    candidates) scored by an LLM judge. They are skipped with a warning naming the file, and a folder
    holding only them is one error saying why, not a 'file not found' for 1_plotQA."""
    root = make_mlvu(tmp_path / "mlvu", Videos(tmp_path))
    gen = [{"video": "subPlot_1.mp4", "duration": 500, "question": "Describe the scene where he runs.",
            "answer": "He runs to the car.", "question_type": "subPlot", "scoring_points": ["runs", "car"]}]
    _dump(root / "json" / "8_sub_scene.json", gen)
    with caplog.at_level("WARNING", logger="storm_vlm.eval"):
        recs = load_benchmark("mlvu", root)
    assert len(recs) == 3 and "8_sub_scene.json" in caplog.text and "generation task" in caplog.text
    only = tmp_path / "only"
    _dump(only / "json" / "8_sub_scene.json", gen)
    with pytest.raises(BenchmarkFormatError, match=r"8_sub_scene\.json.*generation task.*not supported"):
        load_benchmark("mlvu", only)
