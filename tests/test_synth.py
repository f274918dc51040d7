"""The synthetic benchmark: determinism, balance, formats, recoverable answers, CLI."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from storm_vlm.cli import main
from storm_vlm.demo.synth import (
    ANSWER_PROMPT,
    check_sample,
    generate_synthetic_benchmark,
    read_all_frames,
)
from storm_vlm.demo.synth_tasks import LETTERS, PALETTE, TASKS, recover_fact
from storm_vlm.errors import StormError


def load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    # 8 videos per task, half held out: 4 per (task, split), so letters can balance exactly.
    meta = generate_synthetic_benchmark(out, num_videos=8 * len(TASKS), num_frames=32, size=64, seed=3, split=0.5,
                                        num_images=12, workers=1)
    return out, meta


def test_outputs_and_json_formats(bench):
    out, meta = bench
    train, test, align = load(out, "train.json"), load(out, "test.json"), load(out, "align.json")
    assert load(out, "meta.json") == meta
    assert meta["seed"] == 3 and meta["frames"] == 32 and meta["size"] == 64 and meta["tasks"] == list(TASKS)
    assert (len(train), len(test), len(align)) == (meta["num_train"], meta["num_test"], 12) == (4 * len(TASKS), 4 * len(TASKS), 12)
    for r in train:
        assert set(r) == {"id", "video", "task", "conversations"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        lines = human["value"].split("\n")
        assert lines[0] == "<video>" and lines[-1] == ANSWER_PROMPT
        assert [line[:3] for line in lines[2:6]] == ["A. ", "B. ", "C. ", "D. "]
        assert gpt["value"] in LETTERS
    for r in test:
        assert set(r) == {"id", "video", "question", "options", "answer", "task"}
        assert [o[:3] for o in r["options"]] == ["A. ", "B. ", "C. ", "D. "]
        assert len({o[3:] for o in r["options"]}) == 4 and r["answer"] in LETTERS and r["task"] in TASKS
    for r in train + test:
        assert not os.path.isabs(r["video"]) and os.path.isfile(os.path.join(out, r["video"]))
    assert not {r["video"] for r in train} & {r["video"] for r in test}  # distinct videos per split
    assert len(os.listdir(os.path.join(out, "videos"))) == 8 * len(TASKS)
    for r in align:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>") and gpt["value"].endswith("grey background.")
        image = np.asarray(Image.open(os.path.join(out, r["image"])).convert("RGB"))
        assert image.shape == (64, 64, 3)
        colour = gpt["value"].split()[1]
        assert colour in PALETTE
        # the caption's colour is really in the picture
        assert (np.abs(image.astype(int) - PALETTE[colour]).sum(-1) < 10).sum() > 40


def test_answers_are_balanced_per_task_and_split(bench):
    out, _ = bench
    train, test = load(out, "train.json"), load(out, "test.json")
    for records, answer in ((train, lambda r: r["conversations"][1]["value"]), (test, lambda r: r["answer"])):
        for task in TASKS:
            counts = Counter(answer(r) for r in records if r["task"] == task)
            assert counts == Counter({letter: 1 for letter in LETTERS}), (task, counts)


def test_checker_recovers_every_answer_and_rejects_wrong_ones(bench):
    out, _ = bench
    for r in load(out, "train.json") + load(out, "test.json"):
        path = os.path.join(out, r["video"])
        assert check_sample(path, r), r["id"]
        if "answer" in r:
            wrong = dict(r, answer=LETTERS[(LETTERS.index(r["answer"]) + 1) % 4])
            assert not check_sample(path, wrong), r["id"]


def test_tasks_need_frames_from_across_the_video(bench):
    out, _ = bench
    test = load(out, "test.json") + [
        {"task": r["task"], "video": r["video"]} for r in load(out, "train.json")]
    flash_frames = []
    for r in test:
        frames = read_all_frames(os.path.join(out, r["video"]))
        assert frames.shape == (32, 64, 64, 3)
        if r["task"] == "transient":
            diff = np.abs(frames.astype(int) - np.median(frames, axis=0)).reshape(32, -1).mean(1)
            flash_frames.append(int(np.argmax(diff)))
        if r["task"] == "direction":  # first and last frames agree: the motion is only in between
            assert recover_fact(frames[[0, -1]], "direction") is None
            assert recover_fact(frames, "direction") is not None
    assert len(flash_frames) == 8
    # Frames kept by 8x temporal subsampling (0, 8, 16, 24) catch the one-frame flash only sometimes.
    assert sum(t % 8 == 0 for t in flash_frames) <= 3 and len(set(flash_frames)) >= 5


def test_deterministic_for_a_seed_serial_or_pooled(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    kwargs = dict(num_videos=20, num_frames=16, size=32, split=0.2, num_images=4)
    generate_synthetic_benchmark(a, seed=7, workers=1, **kwargs)
    generate_synthetic_benchmark(b, seed=7, workers=2, **kwargs)
    generate_synthetic_benchmark(c, seed=8, workers=1, **kwargs)
    for name in ("train.json", "test.json", "align.json", "meta.json"):
        assert load(a, name) == load(b, name)
    assert load(a, "train.json") != load(c, "train.json")
    for video in sorted(os.listdir(os.path.join(a, "videos"))):
        np.testing.assert_array_equal(read_all_frames(os.path.join(a, "videos", video)),
                                      read_all_frames(os.path.join(b, "videos", video)))


def test_long_videos_and_mpeg4(tmp_path):
    out = str(tmp_path / "long")
    generate_synthetic_benchmark(out, num_videos=len(TASKS), num_frames=512, size=32, seed=1, split=0.0, num_images=0,
                                 codec="mpeg4")
    train = load(out, "train.json")
    assert sorted(r["task"] for r in train) == sorted(TASKS)
    for r in train:
        assert read_all_frames(os.path.join(out, r["video"])).shape[0] == 512
        assert check_sample(os.path.join(out, r["video"]), r), r["id"]


def test_task_subset(tmp_path):
    meta = generate_synthetic_benchmark(tmp_path, num_videos=8, num_frames=16, size=32, seed=0,
                                        tasks=["count", "order"], num_images=0)
    assert meta["tasks"] == ["count", "order"]
    assert {r["task"] for r in load(tmp_path, "train.json") + load(tmp_path, "test.json")} == {"count", "order"}


def test_cli_writes_files(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--videos", "10", "--frames", "16", "--size", "32", "--seed", "5"]) == 0
    meta = load(out, "meta.json")
    assert (meta["num_videos"], meta["frames"], meta["size"], meta["seed"]) == (10, 16, 32, 5)
    assert meta["num_train"] + meta["num_test"] == 10 and meta["num_images"] == 10
    assert len(os.listdir(out / "videos")) == 10 and len(os.listdir(out / "images")) == 10
    assert "10 videos" in capsys.readouterr().out


@pytest.mark.parametrize("flags, flag", [
    (["--frames", "8"], "--frames"), (["--frames", "600"], "--frames"), (["--size", "30"], "--size"),
    (["--videos", "0"], "--videos"), (["--seed", "-1"], "--seed"), (["--tasks", "transient,bogus"], "--tasks"),
    (["--test-fraction", "1.5"], "--test-fraction"), (["--workers", "0"], "--workers")])
def test_cli_bad_flags(tmp_path, capsys, flags, flag):
    out = tmp_path / "bad"
    assert main(["synth", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (out / "meta.json").exists()


def test_api_rejects_bad_values(tmp_path):
    with pytest.raises(StormError, match="num_frames"):
        generate_synthetic_benchmark(tmp_path, num_videos=2, num_frames=1000)
    with pytest.raises(StormError, match="tasks"):
        generate_synthetic_benchmark(tmp_path, num_videos=2, num_frames=16, tasks=["nope"])


def test_text_answers_write_option_texts_to_train_json_only(tmp_path, capsys):
    from storm_vlm.demo.synth import option_text_answers

    kwargs = dict(num_videos=2 * len(TASKS), num_frames=16, size=32, seed=4, split=0.5, num_images=2, workers=1)
    letters = generate_synthetic_benchmark(tmp_path / "letter", **kwargs)
    assert main(["synth", str(tmp_path / "text"), "--videos", str(2 * len(TASKS)), "--frames", "16", "--size", "32",
                 "--seed", "4", "--test-fraction", "0.5", "--images", "2", "--workers", "1", "--answers", "text"]) == 0
    assert "answers are the options' texts" in capsys.readouterr().out
    meta = load(tmp_path / "text", "meta.json")
    assert letters["answers"] == "letter" and meta["answers"] == "text"
    assert {k: v for k, v in meta.items() if k != "answers"} == {k: v for k, v in letters.items() if k != "answers"}
    for name in ("test.json", "align.json"):
        assert load(tmp_path / "text", name) == load(tmp_path / "letter", name)
    by_letter, by_text = load(tmp_path / "letter", "train.json"), load(tmp_path / "text", "train.json")
    assert by_text == option_text_answers(by_letter)
    for a, b in zip(by_letter, by_text):
        human = a["conversations"][0]["value"]
        letter, text = a["conversations"][1]["value"], b["conversations"][1]["value"]
        assert b["conversations"][0]["value"] == human and text not in LETTERS
        assert f"\n{letter}. {text}\n" in human  # the answer's own option line
        assert check_sample(tmp_path / "text" / b["video"], b), b["id"]  # the checker reads text answers too


def test_option_text_answers_rejects_an_answer_that_is_no_option():
    from storm_vlm.demo.synth import option_text_answers

    human = "<video>\nWhat colour?\nA. red\nB. cyan\nC. blue\nD. green\n" + ANSWER_PROMPT
    rec = {"id": "x", "video": "v.mp4", "conversations": [{"from": "human", "value": human},
                                                          {"from": "gpt", "value": "B"}]}
    assert option_text_answers([rec])[0]["conversations"][1]["value"] == "cyan"
    assert rec["conversations"][1]["value"] == "B"  # the input is not modified
    with pytest.raises(StormError, match="'E' is not one of its options"):
        option_text_answers([{**rec, "conversations": [rec["conversations"][0], {"from": "gpt", "value": "E"}]}])


def test_bad_answers_format_is_refused(tmp_path, capsys):
    with pytest.raises(StormError, match="answers='words'"):
        generate_synthetic_benchmark(tmp_path / "a", num_videos=2, num_frames=16, size=32, answers="words")
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        main(["synth", str(tmp_path / "b"), "--answers", "words"])
    assert exit_info.value.code == 2
    assert "--answers" in capsys.readouterr().err and not (tmp_path / "b" / "meta.json").exists()
