"""`storm-vlm eval` as a batch job: reruns after kills and failures, what a folder may be resumed
from, and what a run whose every video failed says."""

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storm_vlm.cli import main
from storm_vlm.errors import StormError
from storm_vlm.eval import evaluate_with_predictor, load_benchmark
from storm_vlm.eval.records import Record
from storm_vlm.eval.runner import run_predictions

from test_eval_fixtures import Videos, make_synthetic
from test_eval_runner import FailsOn, Scripted


def _blank(record):
    return np.zeros((2, 8, 8, 3), np.uint8)


def _run(predictor, records, out, **kw):
    return evaluate_with_predictor(predictor, records, out, num_frames=2, progress=False, print_table=False,
                                   frame_loader=_blank, **kw)


@pytest.fixture
def records(tmp_path):
    return load_benchmark("synthetic", make_synthetic(tmp_path / "syn", Videos(tmp_path), n=6))


def test_a_failure_in_a_killed_runs_shard_does_not_hide_the_answer_a_rerun_made(records, tmp_path):
    """A 2-rank run killed before rank 0 merged leaves its shards; a rerun with one process answers
    the question rank 1 failed on in predictions.jsonl. That answer is what is scored."""
    out = tmp_path / "out"
    run_predictions(records, Scripted(), out, frame_loader=_blank, rank=0, world_size=2, progress=False)
    run_predictions(records, FailsOn("syn-1"), out, frame_loader=_blank, rank=1, world_size=2, progress=False)
    again = Scripted()
    res = _run(again, records, out)
    assert again.calls == ["syn-1"]
    assert res["counts"]["model_failures"] == 0 and res["model_failure_ids"] == []
    assert res["counts"]["correct"] == 2  # syn-0 and syn-3, as in an uninterrupted run
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"syn-{i}" for i in range(6)] and rows[1]["status"] == "answered"


def test_a_rerun_left_with_only_questions_the_model_failed_on_is_scored_not_stopped(records, tmp_path):
    """Five questions too long for the model fail again on a rerun: the run is not taken for a broken
    model (it answered before, with these settings), and results.json is written."""
    out = tmp_path / "out"
    too_long = [f"syn-{i}" for i in range(1, 6)]
    _run(FailsOn(*too_long), records, out)
    (out / "results.json").unlink()
    res = _run(FailsOn(*too_long), records, out)
    assert res["counts"]["model_failures"] == 5 and res["counts"]["answered"] == 1
    assert json.loads((out / "results.json").read_text())["model_failure_ids"] == too_long


def test_records_sharing_an_id_are_refused(tmp_path):
    recs = [Record(id=f"q{i % 2}", benchmark="synthetic", video="v", question=f"q{i}", options=("a", "b"),
                   answer=i % 2) for i in range(3)]
    with pytest.raises(StormError, match="records 0 and 2 share the id 'q0'"):
        _run(Scripted(), recs, tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_predictions_without_their_run_config_are_not_added_to(records, tmp_path):
    out = tmp_path / "out"
    _run(Scripted(), records, out, limit=2)
    (out / "run_config.json").unlink()
    with pytest.raises(StormError, match=r"predictions.jsonl holds predictions but there is no run_config.json"):
        _run(Scripted(), records, out)


def test_another_data_root_is_another_setting(records, tmp_path):
    out = tmp_path / "out"
    _run(Scripted(), records, out, limit=2, settings={"data_root": "/data/MLVU_dev"})
    with pytest.raises(StormError, match="data_root: '/data/MLVU_dev' before, '/data/MLVU_Test' now"):
        _run(Scripted(), records, out, settings={"data_root": "/data/MLVU_Test"})


def test_a_run_whose_every_video_failed_says_so(records, tmp_path, caplog):
    def broken(record):
        raise FileNotFoundError(f"{record.video}: no such file")

    with caplog.at_level(logging.WARNING, "storm_vlm.eval"):
        res = evaluate_with_predictor(Scripted(), records, tmp_path / "out", num_frames=2, progress=False,
                                      print_table=False, frame_loader=broken)
    assert res["accuracy"] is None and res["accuracy_all"] == 0 and res["counts"]["decode_failures"] == 6
    assert "the video of every one of the 6 questions failed to decode (the first, syn-0: FileNotFoundError" \
        in caplog.text
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| accuracy (questions seen) | n/a |" in table
    assert "| task |" not in table  # no breakdown table without a row


def test_the_cli_records_the_data_root_and_refuses_a_resume_from_another(qwen2_mamba_dir, tmp_path, capsys):
    root = make_synthetic(tmp_path / "a", Videos(tmp_path), n=2)
    shutil.copytree(root, tmp_path / "b")
    out = tmp_path / "out"
    args = ["eval", str(qwen2_mamba_dir), "--benchmark", "synthetic", "--output", str(out), "--frames", "2",
            "--max-new-tokens", "2", "--no-progress", "--device", "cpu", "--precision", "float32"]
    assert main(args + ["--data-root", str(root), "--limit", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["data_root"] == str(root.resolve())
    assert main(args + ["--data-root", str(tmp_path / "b")]) == 2
    assert "data_root" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sigkilled_cli_run_resumes_to_the_uninterrupted_runs_results(qwen2_mamba_dir, tmp_path):
    """A real `storm-vlm eval` process killed with SIGKILL mid-run, then rerun: the same rows (ids in
    order, replies) and the same scores as a run never interrupted."""
    root = make_synthetic(tmp_path / "syn", Videos(tmp_path), n=30)

    def cmd(out):
        return [sys.executable, "-m", "storm_vlm", "eval", str(qwen2_mamba_dir), "--benchmark", "synthetic",
                "--data-root", str(root), "--output", str(out), "--frames", "2", "--max-new-tokens", "4",
                "--no-progress", "--device", "cpu", "--precision", "float32"]

    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred = killed / "predictions.jsonl"
    while proc.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it was killed"
    assert not (killed / "results.json").exists()
    subprocess.run(cmd(killed), check=True, capture_output=True, timeout=300)

    def rows(out):
        timing = ("latency_s", "prefill_s")
        return [{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (out / "predictions.jsonl").read_text().splitlines()]

    assert rows(killed) == rows(tmp_path / "full")
    full, resumed = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "full", killed))
    for key in ("accuracy", "accuracy_all", "counts", "breakdowns", "unparsed_ids"):
        assert resumed[key] == full[key], key
