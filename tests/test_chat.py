"""ChatSession (a conversation about one video, encoded once) and `storm-vlm chat` without -q."""

import subprocess
import sys

import pytest
import torch
from helpers import random_video, write_mp4

from storm_vlm.inference import ChatSession, Predictor, build_messages


@pytest.fixture(scope="module")
def predictor(qwen2_mamba_dir):
    return Predictor.from_pretrained(qwen2_mamba_dir, "cpu", "float32")


def _fresh(predictor, frames, question, history):
    """What a new session would answer for the same conversation (everything encoded again)."""
    inputs = predictor.encode(predictor.render(build_messages(question, history)), [frames])
    with torch.inference_mode():
        out = predictor.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return predictor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_each_turn_answers_as_a_fresh_encode_and_the_video_is_encoded_once(predictor):
    frames = random_video(6, seed=11)
    calls = []  # the projector runs once per encoded video
    hook = predictor.model.projector.register_forward_hook(lambda *a: calls.append(1))
    try:
        session = ChatSession(predictor, frames)
        for question in ("What colour is the square?", "Where is it?", "Are you sure?"):
            history = list(session.history)
            reply = session.ask(question, max_new_tokens=6)
            assert reply.visual_tokens == predictor.visual_tokens(6)
            encoded = len(calls)
            assert reply.text == _fresh(predictor, frames, question, history)
            del calls[encoded:]
        assert encoded == 1  # the video was encoded for the first turn only
        session.reset()
        text = session.ask("What colour is the square?", max_new_tokens=6).text
        assert len(calls) == 1  # /reset keeps the video's encoding
        assert text == _fresh(predictor, frames, "What colour is the square?", [])
        del calls[1:]
        session.set_video(random_video(3, seed=12))
        session.ask("What now?", max_new_tokens=2)
        assert len(calls) == 2  # a new video is encoded again
    finally:
        hook.remove()


def test_interactive_chat_reads_questions_and_commands(qwen2_mamba_dir, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", random_video(8, seed=3))
    script = "What colour?\n/reset\n/video missing.mp4\n/frobnicate\nAnd now?\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "storm_vlm", "chat", str(qwen2_mamba_dir), str(video), "--frames",
                          "4", "--max-new-tokens", "3", "--options", "red", "green", "blue"],
                         input=script, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines.count("-> names none of the options") + sum(l.startswith("-> ") and ". " in l for l in lines) == 2
    assert "(conversation cleared; same video)" in lines
    assert any(l.startswith("error: missing.mp4: ") for l in lines)
    assert any(l.startswith("unknown command /frobnicate") for l in lines)
    assert "loaded " in out.stderr and "Loading weights" not in out.stderr and "%|" not in out.stderr
    assert "torchvision" not in out.stderr


def test_chat_reads_a_folder_of_frames_as_the_video_of_those_frames(qwen2_mamba_dir, predictor, tmp_path, capsys):
    from PIL import Image

    from storm_vlm.cli import main

    frames = random_video(4, seed=5)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):  # numbered by value: 10 comes after 9
        Image.fromarray(frame).save(tmp_path / "frames" / f"{[1, 2, 9, 10][i]}.png")
    args = [str(qwen2_mamba_dir), "--frames", "4", "--max-new-tokens", "4", "-q", "What?", "--precision", "float32"]
    assert main(["chat", args[0], str(tmp_path / "frames"), *args[1:]]) == 0
    expected = ChatSession(predictor, frames).ask("What?", 4).text  # the frames themselves, in number order
    assert expected and capsys.readouterr().out.strip() == expected.strip()
    assert main(["chat", args[0], str(tmp_path / "frames"), *args[1:], "--start", "1"]) == 2
    assert "has no timestamps" in capsys.readouterr().err
    assert main(["chat", args[0], "https://example.com/clip.mp4", *args[1:]]) == 2
    assert "URLs are not fetched" in capsys.readouterr().err


def test_an_empty_answer_is_said_as_such(predictor):
    import io

    from transformers import LogitsProcessorList

    from storm_vlm.inference import EMPTY_ANSWER, PrintStreamer

    eos = predictor.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def force_eos(input_ids, scores):
        scores[:] = -float("inf")
        scores[:, eos] = 0
        return scores

    out = io.StringIO()
    reply = ChatSession(predictor, random_video(4)).ask(
        "Say nothing.", max_new_tokens=3, streamer=PrintStreamer(predictor.tokenizer, out),
        logits_processor=LogitsProcessorList([force_eos]))
    assert reply.text == "" and out.getvalue() == EMPTY_ANSWER + "\n"
    out = io.StringIO()
    reply = ChatSession(predictor, random_video(4)).ask("Say something.", max_new_tokens=3,
                                                        streamer=PrintStreamer(predictor.tokenizer, out))
    assert out.getvalue().strip() == reply.text != ""
