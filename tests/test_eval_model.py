"""End to end with a tiny random STORM model: every benchmark layout, the CLI, the lmms-eval adapter."""

import json
from pathlib import Path

import pytest

from storm_vlm.cli import main
from storm_vlm.eval import evaluate, load_benchmark

from test_eval_fixtures import MAKERS, Videos

EXPECTED_BREAKDOWNS = {
    "videomme": {"duration": {"short": 2, "medium": 1, "long": 1}, "domain": {"Knowledge": 2, "Sports Competition": 2},
                 "sub_category": {"Astronomy": 2, "Football": 1, "Basketball": 1},
                 "task_type": {"Counting Problem": 2, "OCR Problems": 1, "Action Recognition": 1}},
    "mvbench": {"task": {"action_sequence": 2, "object_shuffle": 1, "episodic_reasoning": 1}},
    "mlvu": {"question_type": {"plotQA": 2, "count": 1}},
    "longvideobench": {"duration_group": {"15": 1, "600": 1}, "question_category": {"S2E": 1, "E3E": 1}},
    "egoschema": {},
    "synthetic": {"task": {"order": 2, "count": 2}},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from storm_vlm.inference import load_model
    from storm_vlm.demo.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    # float32: the scores below are compared at 1e-3, finer than the bfloat16 precision's rounding
    # ("auto" on a CPU with native bf16), where a decode step and a forward round differently
    model, processor = load_model(str(path), "cpu", "float32")
    return path, model, processor


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    videos = Videos(base)
    return {name: make(base / name, videos) for name, make in MAKERS.items()}


@pytest.mark.parametrize("bench", list(MAKERS))
def test_tiny_model_on_each_layout_writes_results_with_breakdowns(bench, tiny, layouts, tmp_path):
    path, model, processor = tiny
    records = load_benchmark(bench, layouts[bench])
    res = evaluate(model, processor, records, tmp_path / "out", num_frames=2, max_new_tokens=3, progress=False,
                   print_table=False, model_dir=str(path))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["counts"] == res["counts"]
    c = saved["counts"]
    assert c["total"] == c["predicted"] == len(records) and c["decode_failures"] == 0
    assert c["answered"] + c["unparsed"] == len(records)
    got = {k: {v: g["count"] for v, g in groups.items()} for k, groups in saved["breakdowns"].items()}
    assert got == EXPECTED_BREAKDOWNS[bench]
    s = saved["settings"]
    assert (s["model"], s["num_frames"], s["max_new_tokens"]) == (str(path), 2, 3)
    assert s["compression"]["projector_type"] == "mamba" and s["decoding"]["do_sample"] is False
    assert "Answer with the option's letter" in s["prompt"]["template"]
    assert s["visual_tokens_at_num_frames"] == model.config.num_visual_tokens(2)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(isinstance(r["reply"], str) and r["num_frames"] == 2 for r in rows)
    assert all(0 < r["prefill_s"] <= r["latency_s"] for r in rows) and saved["mean_prefill_s"] > 0
    if bench in ("mvbench", "mlvu"):
        assert saved["headline"]["value"] == saved[f"mean_over_{'task' if bench == 'mvbench' else 'question_type'}"]


def test_cli_runs_resumes_and_records_a_broken_video(tiny, tmp_path, capsys):
    path = tiny[0]
    root = MAKERS["synthetic"](tmp_path / "syn", Videos(tmp_path))
    (root / "videos" / "2.mp4").write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    args = ["eval", str(path), "--benchmark", "synthetic", "--data-root", str(root), "--output", str(out),
            "--frames", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(args + ["--limit", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["counts"]["total"] == 2
    assert main(args + ["--temporal-sample", "2", "--limit", "2"]) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err
    assert main(args) == 0  # resumes: only the last two are new
    res = json.loads((out / "results.json").read_text())
    assert res["counts"]["total"] == 4 and res["counts"]["decode_failures"] == 1
    assert res["decode_failure_ids"] == ["syn-2"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert "| decode failures | 1 |" in (out / "results.md").read_text()
    assert "| decode failures | 1 |" in capsys.readouterr().out


def test_a_resume_with_another_precision_is_refused(tiny, tmp_path):
    from storm_vlm.errors import StormError
    from storm_vlm.precision import resolve_precision

    path, model, processor = tiny
    records = load_benchmark("synthetic", MAKERS["synthetic"](tmp_path / "syn", Videos(tmp_path)))
    out = tmp_path / "out"
    kw = dict(num_frames=2, max_new_tokens=2, progress=False, print_table=False, model_dir=str(path), limit=1)
    evaluate(model, processor, records, out, precision=resolve_precision("float32", "cpu"), **kw)
    fp32 = {"weights": "float32", "llm_linears": None, "autocast": None}
    assert json.loads((out / "run_config.json").read_text())["precision"] == fp32
    assert json.loads((out / "results.json").read_text())["settings"]["precision"] == fp32
    with pytest.raises(StormError, match="other settings.*precision"):
        evaluate(model, processor, records, out, precision=resolve_precision("bfloat16", "cpu"), **kw)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--benchmark", "synthetic", "--data-root", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "test.json").write_text("[]")  # annotations without a question: said before the model loads
    (tmp_path / "config.json").write_text('{"model_type": "storm"}')
    assert main(["eval", str(tmp_path), "--benchmark", "synthetic", "--data-root", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}: its synthetic annotations hold no questions" in capsys.readouterr().err


def test_lmms_eval_generate_until_with_the_real_api(tiny, tmp_path):
    pytest.importorskip("lmms_eval.api.model")  # the API, not only the package (it needs loguru)
    from lmms_eval.api.instance import Instance

    from storm_vlm.eval.lmms_plugin import Storm, cut_at_stops
    from storm_vlm.video import load_video
    from test_eval_fixtures import write_mp4

    video = write_mp4(tmp_path / "v.mp4")
    lm = Storm(pretrained=str(tiny[0]), num_frames=2, max_new_tokens=4)
    lm.task_dict = {"toy": {"test": [{"video": str(video)}]}}
    req = Instance(request_type="generate_until", idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1},
                   arguments=("What happens?\nA. x\nB. y", {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]},
                              lambda doc: [doc["video"]], 0, "toy", "test"))
    ll_req = Instance(request_type="loglikelihood", idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1},
                      arguments=("What happens?", " B", lambda doc: [doc["video"]], 0, "toy", "test"))
    ((ll, greedy),) = lm.loglikelihood([ll_req])
    assert ll > 0 and isinstance(greedy, bool)  # a loss (lmms-eval picks the lowest), not a log-probability
    (reply,) = lm.generate_until([req])
    frames = load_video(video, num_frames=2).frames
    expected = cut_at_stops(lm.predictor.reply("What happens?\nA. x\nB. y", frames, max_new_tokens=3), ["\n\n"])
    assert isinstance(reply, str) and reply == expected


def test_loglikelihood_matches_the_greedy_generation_scores(tiny, tmp_path):
    import torch

    from storm_vlm.eval import ModelPredictor
    from storm_vlm.inference import build_messages
    from storm_vlm.video import load_video
    from test_eval_fixtures import write_mp4

    _, model, processor = tiny
    predictor = ModelPredictor(model, processor)
    frames = load_video(write_mp4(tmp_path / "v.mp4"), num_frames=2).frames
    inputs = predictor.encode(predictor.render(build_messages("What color is it?")), [frames])
    with torch.inference_mode():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    new = gen.sequences[0, inputs["input_ids"].shape[1]:]
    expected = sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, new))
    text = processor.tokenizer.decode(new)
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == new.tolist()
    ll, greedy = predictor.loglikelihood("What color is it?", text, frames)
    assert ll == pytest.approx(expected, abs=1e-3) and greedy
    other = processor.tokenizer.decode([int(new[0]) + 1]) + text
    ll2, greedy2 = predictor.loglikelihood("What color is it?", other, frames)
    assert not greedy2 and ll2 < 0


@pytest.mark.slow
def test_torchrun_two_ranks_shard_and_rank0_merges(tiny, tmp_path):
    import shutil
    import subprocess
    import sys

    root = MAKERS["synthetic"](tmp_path / "syn", Videos(tmp_path))
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not found")
    cmd = [str(torchrun if torchrun.exists() else shutil.which("torchrun")), "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "storm_vlm", "eval", str(tiny[0]), "--benchmark", "synthetic",
           "--data-root", str(root), "--output", str(out), "--frames", "2", "--max-new-tokens", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"syn-{i}" for i in range(4)] and not list(out.glob("predictions.rank*.jsonl"))
    assert json.loads((out / "results.json").read_text())["counts"]["predicted"] == 4


def test_batched_evaluation_answers_as_one_at_a_time(tiny, layouts, tmp_path):
    """Videos of different lengths in one padded batch get the replies they get alone; a broken
    video in a batch is recorded and the rest of the batch is answered."""
    import numpy as np

    path, model, processor = tiny
    records = load_benchmark("synthetic", layouts["synthetic"])
    rng = np.random.default_rng(0)
    clips = {r.id: rng.integers(0, 256, (2 + i % 3, 64, 64, 3), dtype=np.uint8) for i, r in enumerate(records)}
    broken = records[1].id

    def loader(record):
        if record.id == broken:
            raise ValueError("damaged file")
        return clips[record.id]

    kwargs = dict(num_frames=4, max_new_tokens=5, progress=False, print_table=False, frame_loader=loader)
    evaluate(model, processor, records, tmp_path / "one", **kwargs)
    evaluate(model, processor, records, tmp_path / "batched", batch_size=3, **kwargs)
    read = lambda d: {r["id"]: r for r in map(json.loads, (tmp_path / d / "predictions.jsonl").read_text().splitlines())}
    one, batched = read("one"), read("batched")
    assert one.keys() == batched.keys() == {r.id for r in records}
    assert batched[broken]["status"] == "decode_error" and batched[broken]["reply"] is None
    for rid, row in one.items():
        assert (batched[rid]["reply"], batched[rid].get("num_frames")) == (row["reply"], row.get("num_frames")), rid
    assert len({r["reply"] for r in one.values()}) > 1  # the replies differ: the comparison is not vacuous
