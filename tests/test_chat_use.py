"""`storm-vlm chat` and the Python inference API as a user drives them: what is typed or piped in
(placeholders, bytes that are not UTF-8, Ctrl-C during an answer), generation options, a
conversation outgrowing the context, and reading real multiple-choice replies."""

import io
import sys

import pytest
import torch
from helpers import random_video, write_mp4

from storm_vlm.choices import extract_choice
from storm_vlm.cli import main
from storm_vlm.errors import StormError
from storm_vlm.inference import ChatSession, Predictor, PrintStreamer

FRAMES = random_video(4, seed=31)


@pytest.fixture(scope="module")
def predictor(qwen2_mamba_dir):
    return Predictor.from_pretrained(qwen2_mamba_dir, "cpu", "float32")


def test_typed_placeholders_and_undecodable_bytes_are_asked_as_text(predictor):
    """"<video>" typed in a question (or said in an earlier answer) is text, not a second video; a
    question read from input that was not UTF-8 (lone surrogates) is asked with U+FFFD."""
    session = ChatSession(predictor, FRAMES)
    session.history = [("What is shown?", "It looks like an HTML <video> element.")]
    reply = session.ask("What does the <video> tag do? And <image>?", max_new_tokens=2)
    assert reply.visual_tokens == predictor.visual_tokens(4) and reply.token_ids
    assert ChatSession(predictor, FRAMES).ask("Qu\udce9 color?", max_new_tokens=2).token_ids


def test_a_conversation_that_outgrows_the_context_is_refused_by_name(predictor, monkeypatch):
    session = ChatSession(predictor, FRAMES)
    first = session.ask("What colour?", max_new_tokens=4)
    monkeypatch.setattr(predictor.model.config.get_text_config(), "max_position_embeddings",
                        first.prompt_tokens + 8)
    with pytest.raises(StormError, match=r"do not fit the LLM's \d+ positions"):
        session.ask("Tell me more about the square, its colour and where it moves. " * 4, max_new_tokens=4)
    assert len(session.history) == 1  # the refused question is not part of the conversation
    with pytest.raises(StormError, match="positions"):
        ChatSession(predictor, FRAMES).ask("What colour?", max_new_tokens=16)  # the answer's budget counts
    session.reset()
    assert session.ask("What colour?", max_new_tokens=4).text == first.text


def test_generation_options_act_as_named(predictor):
    """temperature 0 is greedy and above 0 samples (as in vLLM), a seed repeats a sample, stop
    strings end the answer, and bad values are refused with their name."""
    greedy = ChatSession(predictor, FRAMES).ask("What colour?", max_new_tokens=8).token_ids
    assert ChatSession(predictor, FRAMES).ask("What colour?", max_new_tokens=8, temperature=0).token_ids == greedy
    samples = []
    for _ in range(2):
        torch.manual_seed(5)
        samples.append(ChatSession(predictor, FRAMES).ask("What colour?", max_new_tokens=8, temperature=1.0).token_ids)
    assert samples[0] == samples[1] != greedy
    decoded = [predictor.tokenizer.decode([t]) for t in greedy]
    k = next(i for i, piece in enumerate(decoded) if i and piece.strip().isascii() and piece.strip().isalpha())
    stopped = ChatSession(predictor, FRAMES).ask("What colour?", max_new_tokens=8,
                                                 stop_strings=[decoded[k].strip()]).token_ids
    assert stopped == greedy[:len(stopped)] and len(stopped) <= k + 1
    for bad, message in ((dict(temperature=-1), "temperature must be"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(StormError, match=message):
            ChatSession(predictor, FRAMES).ask("What colour?", **{"max_new_tokens": 4, **bad})
        with pytest.raises(StormError, match=message):
            predictor.reply("What colour?", FRAMES, **{"max_new_tokens": 4, **bad})


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_ctrl_c_during_an_answer_returns_to_the_prompt(qwen2_mamba_dir, tmp_path, monkeypatch, capsys):
    """At a terminal Ctrl-C stops the answer being generated, not the conversation (the model
    stays loaded); the next question is answered as in a new conversation."""
    video = str(write_mp4(tmp_path / "clip.mp4", FRAMES))
    args = ["chat", str(qwen2_mamba_dir), video, "--frames", "4", "--max-new-tokens", "4", "--precision", "float32"]
    assert main([*args, "-q", "Where is it?"]) == 0
    expected = capsys.readouterr().out.strip()
    put, calls = PrintStreamer.put, []

    def interrupted(self, value):
        calls.append(1)
        if len(calls) == 2:  # the first generated token
            raise KeyboardInterrupt
        return put(self, value)

    monkeypatch.setattr(PrintStreamer, "put", interrupted)
    monkeypatch.setattr(sys, "stdin", _Terminal("What colour?\nWhere is it?\n"))
    assert main(args) == 0
    out = capsys.readouterr().out
    before, after = out.split("(answer interrupted)")
    assert expected not in before and f">>> {expected}\n" in after


def test_piped_input_that_is_not_utf8_is_asked_not_a_crash(qwen2_mamba_dir, tmp_path, monkeypatch, capsys):
    video = str(write_mp4(tmp_path / "clip.mp4", FRAMES))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Qué color?\n".encode("latin-1")), "utf-8"))
    assert main(["chat", str(qwen2_mamba_dir), video, "--frames", "4", "--max-new-tokens", "2",
                 "--precision", "float32"]) == 0
    assert capsys.readouterr().out.strip()


OPTS = ["The man opens the door.", "The woman sits down.", "A dog barks at the cat.", "Nothing happens."]


@pytest.mark.parametrize("reply,expected", [
    # the answer it declares decides over options it only discusses (Video-MME's reader agrees)
    ("The answer is B. Option A is wrong because the man never opens the door.", 1),
    ("Answer: B\nExplanation: option A is incorrect since the door stays shut.", 1),
    ("Best option: D. Option A would need the door to open.", 3),
    ("The correct option is B, because option C shows no dog.", 1),
    ("The answer is A. No, the answer is C.", None),
    ("Option A is wrong, option B is right", None),
    # an article "A" in the options does not hide a letter the reply names
    ("A and C", None), ("A or C", None), ("Probably C.", 2), ("A dog barks at the cat", 2),
])
def test_real_replies(reply, expected):
    assert extract_choice(reply, OPTS) == expected
