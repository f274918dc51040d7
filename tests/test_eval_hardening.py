"""Evaluation does not trust what it reads back: correctness is recomputed from
the stored reply and the benchmark's answer, prediction rows and run_config.json are validated,
and every reader confines video paths to --data-root."""

import json
import os
from pathlib import Path

import pytest

from storm_vlm.cli import main
from storm_vlm.errors import StormError
from storm_vlm.eval import evaluate_with_predictor, load_benchmark
from storm_vlm.eval.frames import load_record_frames
from storm_vlm.eval.readers import BenchmarkFormatError

from test_eval_fixtures import MAKERS, Videos, _dump, make_mvbench, make_synthetic
from test_eval_runner import Scripted


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def done(tmp_path):
    """A finished synthetic evaluation: 6 questions, 2 right (see Scripted)."""
    root = make_synthetic(tmp_path / "syn", Videos(tmp_path), n=6)
    records = load_benchmark("synthetic", root)
    out = tmp_path / "out"
    res = evaluate_with_predictor(Scripted(), records, out, num_frames=2, progress=False, print_table=False)
    assert res["accuracy"] == pytest.approx(2 / 6)
    return records, out


def rerun(records, out):
    predictor = Scripted()
    res = evaluate_with_predictor(predictor, records, out, num_frames=2, progress=False, print_table=False)
    assert predictor.calls == []  # everything was done: only read back and scored
    return res


def test_a_tampered_correct_flag_does_not_change_the_score(done):
    records, out = done
    pred = out / "predictions.jsonl"
    rows = _lines(pred)
    for row in rows:  # what the issue did: accuracy 0.33 -> 1.0 on main
        row.update(correct=True, status="answered", pred=0, pred_letter="A")
    _write_rows(pred, rows)
    res = rerun(records, out)
    assert res["accuracy"] == pytest.approx(2 / 6) and res["counts"]["correct"] == 2
    assert res["counts"]["unparsed"] == 2 and res["unparsed_ids"] == ["syn-2", "syn-5"]
    assert res["corrected_ids"] == ["syn-1", "syn-2", "syn-3", "syn-4", "syn-5"]  # syn-0: right and said A
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == pytest.approx(2 / 6)


def test_hiding_a_wrong_answer_as_a_decode_failure_is_refused(done):
    records, out = done
    pred = out / "predictions.jsonl"
    rows = _lines(pred)
    rows[1].update(status="decode_error", error="x")  # a wrong answer out of the "questions seen"
    _write_rows(pred, rows)
    with pytest.raises(StormError, match=r"predictions.jsonl, line 2: not a valid prediction row \(a decode_error row "
                                         r"has a 'reply'\)"):
        rerun(records, out)


@pytest.mark.parametrize("edit, cause", [
    (lambda r: r.update(id=None), "'id' must be a non-empty string, got None"),
    (lambda r: r.update(id=""), "'id' must be a non-empty string"),
    (lambda r: r.update(id=7), "'id' must be a non-empty string, got 7"),
    (lambda r: r.update(status="great"), "'status' must be one of"),
    (lambda r: r.pop("reply"), "needs the model's 'reply' text"),
    (lambda r: r.update(latency_s=float("nan")), "'latency_s' must be a finite number"),
    (lambda r: r.update(num_frames=True), "'num_frames' must be an integer"),
])
def test_invalid_rows_are_one_error_naming_file_and_line(done, edit, cause):
    records, out = done
    pred = out / "predictions.jsonl"
    rows = _lines(pred)
    edit(rows[2])
    _write_rows(pred, rows)
    with pytest.raises(StormError) as info:
        rerun(records, out)
    assert "predictions.jsonl, line 3: not a valid prediction row" in str(info.value) and cause in str(info.value)


def test_a_json_list_or_deep_nesting_as_a_row(done):
    records, out = done
    pred = out / "predictions.jsonl"
    text = pred.read_text().splitlines()
    pred.write_text("\n".join(text[:2] + ["[1, 2]"] + text[2:]) + "\n")
    with pytest.raises(StormError, match=r"line 3: not a valid prediction row \(a JSON list, not an object\)"):
        rerun(records, out)
    pred.write_text("\n".join(text[:2] + ["[" * 100_000] + text[2:]) + "\n")
    with pytest.raises(StormError, match=r"line 3: not a prediction record"):
        rerun(records, out)


def test_rows_for_unknown_ids_are_kept_but_not_scored(done):
    records, out = done
    pred = out / "predictions.jsonl"
    rows = _lines(pred)
    _write_rows(pred, rows + [dict(rows[0], id="not-a-question", correct=True)])
    res = rerun(records, out)
    assert res["unknown_ids"] == ["not-a-question"] and res["counts"]["predicted"] == 6
    assert res["accuracy"] == pytest.approx(2 / 6)
    assert [r["id"] for r in _lines(pred)][-1] == "not-a-question"  # finished work is never dropped


@pytest.mark.parametrize("content, cause", [
    ("[1, 2]", "expected a JSON object of run settings, got a list"),
    ("{garbage", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_a_damaged_run_config_is_one_error(done, content, cause):
    records, out = done
    path = out / "run_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StormError, match="run_config.json") as info:
        rerun(records, out)
    assert cause in str(info.value)


# ----------------------------------------------------------------------------- paths confined to the data root
def _escape(name: str, root: Path, target: str) -> None:
    """Point one record of benchmark `name` at `target` (a '..' or absolute path)."""
    if name == "synthetic":
        rows = json.loads((root / "test.json").read_text())
        rows[1]["video"] = target
        _dump(root / "test.json", rows)
    elif name == "mvbench":
        _dump(root / "json" / "object_shuffle.json", [{"video": target, "question": "q", "candidates": ["x", "y"],
                                                      "answer": "x"}])
    elif name == "mlvu":
        rows = json.loads((root / "json" / "4_count.json").read_text())
        rows[0]["video"] = target
        _dump(root / "json" / "4_count.json", rows)
    elif name == "longvideobench":
        rows = json.loads((root / "lvb_val.json").read_text())
        rows[1]["video_path"] = target
        _dump(root / "lvb_val.json", rows)
    elif name == "egoschema":
        qs = json.loads((root / "questions.json").read_text())
        qs[2]["q_uid"] = target
        _dump(root / "questions.json", qs)
        _dump(root / "subset_answers.json", {"uid-a": 3, target: 0})
    elif name == "videomme":
        import pandas as pd

        table = pd.read_parquet(root / "videomme" / "test-00000-of-00001.parquet")
        table.loc[2, "videoID"] = target
        table.to_parquet(root / "videomme" / "test-00000-of-00001.parquet")


RECORD = {"synthetic": "test.json, record 1", "mvbench": "object_shuffle.json, record 0",
          "mlvu": "4_count.json, record 0", "longvideobench": "lvb_val.json, record 1",
          "egoschema": "questions.json, record 2", "videomme": "parquet, record 2"}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_every_reader_refuses_video_paths_outside_the_data_root(tmp_path, name, kind):
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    root = MAKERS[name](tmp_path / "data" / name, Videos(tmp_path))
    depth = {"synthetic": 0, "mvbench": 3, "mlvu": 2, "longvideobench": 1, "egoschema": 1, "videomme": 1}[name]
    target = str(secret) if kind == "absolute" else "../" * (depth + 2) + "secret"
    if name in ("egoschema", "videomme") and kind == "dotdot":
        target = "../" * (depth + 2) + "secret"  # the reader appends .mp4: still outside
    _escape(name, root, target)
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(name, root)
    msg = str(info.value)
    assert RECORD[name] in msg and "outside the data root" in msg and str(root) in msg


def test_a_symlink_out_of_the_data_root_is_refused_and_one_inside_is_fine(tmp_path):
    root = make_synthetic(tmp_path / "syn", Videos(tmp_path), n=2)
    inside = root / "videos" / "1.mp4"
    os.replace(inside, root / "real.mp4")
    inside.symlink_to(root / "real.mp4")
    recs = load_benchmark("synthetic", root)
    assert recs[1].video == str(root.resolve() / "real.mp4")  # the resolved file is what gets opened
    outside = tmp_path / "elsewhere.mp4"
    os.replace(root / "real.mp4", outside)
    inside.unlink()
    inside.symlink_to(outside)
    with pytest.raises(BenchmarkFormatError, match=r"test.json, record 1 \(id 'syn-1'\): video path .* outside the data root"):
        load_benchmark("synthetic", root)


@pytest.mark.parametrize("field, value, cause", [
    ("id", None, "missing field 'id'"),
    ("id", True, "field 'id' should be str or int, got True"),
    ("id", "", "field 'id' should be a non-empty string"),
    ("start", float("nan"), "field 'start' must be seconds"),
    ("start", 1e308, "field 'start' must be seconds"),
    ("end", -2, "field 'end' must be seconds"),
    ("question", "Why\u0000?", "field 'question' holds a NUL character"),
    ("question", "Why\ud800?", "field 'question' holds an unpaired surrogate"),
    ("video", "a\u0000.mp4", "field 'video' holds a NUL character"),
])
def test_reader_fields_are_validated(tmp_path, field, value, cause):
    root = make_synthetic(tmp_path / "syn", Videos(tmp_path), n=2)
    rows = json.loads((root / "test.json").read_text())
    rows[1][field] = value
    (root / "test.json").write_text(json.dumps(rows))  # json.dumps writes NaN; Python's reader accepts it
    with pytest.raises(BenchmarkFormatError, match="test.json, record 1") as info:
        load_benchmark("synthetic", root)
    assert cause in str(info.value)


def test_longvideobench_null_id_and_undecodable_annotations(tmp_path):
    root = MAKERS["longvideobench"](tmp_path / "lvb", Videos(tmp_path))
    rows = json.loads((root / "lvb_val.json").read_text())
    rows[0]["id"] = None
    _dump(root / "lvb_val.json", rows)
    with pytest.raises(BenchmarkFormatError, match=r"lvb_val.json, record 0 \(id None\): field 'id' should be"):
        load_benchmark("longvideobench", root)
    (root / "lvb_val.json").write_bytes(b"[\xff]")
    with pytest.raises(BenchmarkFormatError, match="lvb_val.json: not valid JSON"):
        load_benchmark("longvideobench", root)
    (root / "lvb_val.json").write_text("[" * 100_000)
    with pytest.raises(BenchmarkFormatError, match="lvb_val.json: not valid JSON"):
        load_benchmark("longvideobench", root)


def test_frames_out_of_their_folder_and_fifos_are_decode_failures(tmp_path):
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    rec = next(r for r in load_benchmark("mvbench", root) if r.id == "episodic_reasoning/0")
    folder = Path(rec.video)
    frame = folder / "00005.jpg"
    os.replace(frame, tmp_path / "outside.jpg")
    frame.symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(StormError, match="00005.jpg: a symlink out of its frame folder"):
        load_record_frames(rec, 4)
    plain = next(r for r in load_benchmark("mvbench", root) if r.id == "object_shuffle/0")
    os.unlink(plain.video)
    os.mkfifo(plain.video)
    with pytest.raises(StormError, match="not a regular file"):
        load_record_frames(plain, 2)
    # in a run both become decode_error rows and the run goes on
    res = evaluate_with_predictor(_AnyReply(), [rec, plain], tmp_path / "out", num_frames=4, progress=False,
                                  print_table=False)
    assert res["counts"]["decode_failures"] == 2


class _AnyReply:
    def predict(self, record, frames):
        return "A"


@pytest.mark.parametrize("fps", ["nan", "inf", "0"])
def test_eval_refuses_a_non_finite_fps(tmp_path, capsys, fps):
    rc = main(["eval", str(tmp_path / "model"), "--benchmark", "synthetic", "--data-root", str(tmp_path),
               "--output", str(tmp_path / "out"), "--fps", fps])
    assert rc == 2 and "--fps must be a finite number > 0" in capsys.readouterr().err


def test_a_frame_folder_is_read_in_frame_number_order_and_scaled_as_read(tmp_path):
    """Unpadded frame numbers ("2.png" before "10.png") keep their order, and each frame is scaled
    down to the model's input size while it is read, as video files are."""
    from PIL import Image

    from storm_vlm.eval.frames import load_frame_folder

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 13):
        Image.new("RGB", (64, 48), (10 * i, 0, 0)).save(folder / f"{i}.png")
    frames = load_frame_folder(folder, 12)
    assert [int(f[0, 0, 0]) for f in frames] == [10 * i for i in range(1, 13)]
    assert load_frame_folder(folder, 3, min_side=16).shape == (3, 16, 21, 3)


def test_a_folder_of_videos_given_as_frames_says_what_it_holds(tmp_path):
    from storm_vlm.eval.frames import load_frame_folder
    from storm_vlm.video import VideoDecodeError

    for name in ("b.mp4", "a.mp4"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="holds no images .*; it holds a.mp4, b.mp4: for a video, pass the file"):
        load_frame_folder(tmp_path, 4)
