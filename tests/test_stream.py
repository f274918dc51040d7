"""Streaming ingestion (`storm_vlm.streaming`): a video fed chunk by chunk through the causal projector
gives the features and the greedy answers of a one-shot pass over the same frames, pooling windows
that straddle chunks included; the question turn leaves the cache; past the budget memory stays
bounded; a bidirectional model refuses with a clear error."""

import numpy as np
import pytest
import torch
from helpers import random_video

from storm_vlm.builder import build_storm, save_storm
from storm_vlm.errors import StormError
from storm_vlm.inference import Predictor, build_messages
from storm_vlm.model.projector import MambaTemporalProjector
from storm_vlm.streaming.memory import MEMORY_POLICIES, select_kept
from storm_vlm.streaming.stream import StormStream

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, qwen2_parts):
    """Tiny causal STORM: 2 causal Mamba layers, temporal pool k=3, spatial pool 2 (4 tokens per frame)."""
    model, processor = build_storm(*qwen2_parts, projector_type="mamba", projector_bidirectional=False,
                                   projector_num_layers=2, temporal_pool_size=3, spatial_pool_stride=2)
    return save_storm(model, processor, tmp_path_factory.mktemp("storm-causal") / "model")


@pytest.fixture(scope="module")
def predictor(causal_dir):
    return Predictor.from_pretrained(causal_dir, "cpu", "float32")


def _one_shot(predictor, frames, stride, max_new_tokens=6):
    """(features (T', N', D), greedy answer ids) of the whole `frames` encoded at once."""
    inputs = predictor.encode(predictor.render(build_messages(QUESTION)), [frames], stride)
    with torch.inference_mode():
        feats, _ = predictor.model.get_video_features(inputs["pixel_values_videos"], inputs["video_frame_mask"],
                                                      video_token_layout=inputs["video_token_layout"])
        out = predictor.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return feats[0], out[0, inputs["input_ids"].shape[1]:].tolist()


def test_projector_chunk_by_chunk_equals_the_whole_video():
    torch.manual_seed(0)
    proj = MambaTemporalProjector(8, 16, num_layers=2, bidirectional=False).double().eval()
    feats = torch.randn(2, 11, 16, 8, dtype=torch.float64)  # 4 x 4 patch grid -> 4 tokens per frame
    with torch.no_grad():
        whole = proj(feats)
        outs, states = [], None
        for a, b in zip([0, 1, 2, 6, 7], [1, 2, 6, 7, 11]):  # chunks of 1 frame (4 tokens, d_conv = 4) and more
            out, states = proj.forward_chunk(feats[:, a:b], states)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="bidirectional"):
        MambaTemporalProjector(8, 16, bidirectional=True).forward_chunk(feats)


@pytest.mark.parametrize("stride", [1, 2])
def test_stream_equals_one_shot_features_and_answers(predictor, stride):
    frames = random_video(14, seed=1)
    stream = StormStream(predictor, temporal_sample_stride=stride)
    # k = 3: windows [0-2] [3-5] [6-8] [9-11] [12-13 partial]; chunk edges fall inside windows and on them
    for end in (1, 3, 7, 8, 14):
        stream.feed(frames[stream.frames_seen:end])
        feats, answer = _one_shot(predictor, frames[:end], stride)
        complete = len(stream.kept_indices)
        assert stream.kept_indices == list(range(0, end // 3, stride))
        torch.testing.assert_close(stream.features(), feats[:complete], rtol=1e-5, atol=1e-5)
        reply = stream.ask(QUESTION, max_new_tokens=6)
        assert reply.token_ids == answer, f"after {end} frames"
        assert reply.visual_tokens == predictor.processor.num_visual_tokens(end, stride)
        # the question turn (and a partial window) left the cache: prompt opening + kept visual tokens
        assert stream.stats()["cache_tokens"] == len(stream._prefix_ids) + stream.visual_tokens


def test_asking_twice_and_feeding_on_gives_the_same_as_one_shot(predictor):
    frames = random_video(10, seed=2)
    stream = StormStream(predictor)
    stream.feed(frames[:5])  # a partial window (frames 3, 4) is pending
    first = stream.ask(QUESTION, max_new_tokens=5)
    assert stream.ask(QUESTION, max_new_tokens=5).token_ids == first.token_ids
    stream.feed(frames[5:])
    assert stream.ask(QUESTION, max_new_tokens=5).token_ids == _one_shot(predictor, frames, None, 5)[1]


def test_a_bidirectional_model_refuses_to_stream(qwen2_mamba_dir):
    predictor = Predictor.from_pretrained(qwen2_mamba_dir, "cpu", "float32")
    with pytest.raises(StormError, match="projector_bidirectional=False"):
        StormStream(predictor)


def test_errors_name_the_cause(predictor):
    stream = StormStream(predictor)
    with pytest.raises(StormError, match="no frames"):
        stream.ask(QUESTION)
    with pytest.raises(StormError, match="less than one frame"):
        StormStream(predictor, max_visual_tokens=3)
    with pytest.raises(StormError, match="no room for a question"):
        StormStream(predictor, max_visual_tokens=4096)
    with pytest.raises(StormError, match="memory policy"):
        StormStream(predictor, memory_policy="forget")


# ---- bounded memory ---------------------------------------------------------------------------------


def test_select_kept_policies():
    assert select_kept(5, 8) == [0, 1, 2, 3, 4]
    # resample: every 2nd of the oldest half, the recent half whole
    assert select_kept(9, 8, "resample") == [0, 2, 4, 5, 6, 7, 8]
    # uniform: every 2nd, counted from the newest
    assert select_kept(9, 8, "uniform") == [0, 2, 4, 6, 8]
    # window: the most recent three quarters of the budget
    assert select_kept(9, 8, "window") == [3, 4, 5, 6, 7, 8]
    for policy in MEMORY_POLICIES:
        for count in range(1, 40):
            kept = select_kept(count, 5, policy)
            assert len(kept) <= 5 and kept[-1] == count - 1 and kept == sorted(set(kept))
    assert select_kept(3, 1, "resample") == [2]


@pytest.mark.parametrize("policy", MEMORY_POLICIES)
def test_memory_stays_bounded_past_the_budget(predictor, policy):
    stream = StormStream(predictor, max_visual_tokens=24, memory_policy=policy)  # 6 pooled frames of 4 tokens
    frames = random_video(60, seed=3, height=16, width=16)
    sizes = []
    for i in range(0, 60, 4):
        stats = stream.feed(frames[i:i + 4])
        assert stream.visual_tokens <= 24
        assert stream.stats()["cache_tokens"] == len(stream._prefix_ids) + stream.visual_tokens
        sizes.append(stream.memory_bytes())
    assert stream.rebuilds > 0 and stats.frames == 4
    assert stream.kept_indices[-1] == 60 // 3 - 1  # the newest pooled frame is kept
    # after the budget is first reached, the features held stay within the budget's size
    assert max(s["features"] for s in sizes) <= 24 * 64 * 4
    assert max(s["kv_cache"] for s in sizes[-5:]) <= max(s["kv_cache"] for s in sizes[:8])
    reply = stream.ask(QUESTION, max_new_tokens=3)
    assert reply.visual_tokens <= 24 + 4


def test_rebuilt_cache_answers_as_a_one_shot_pass_over_the_kept_tokens(predictor):
    stream = StormStream(predictor, max_visual_tokens=16, memory_policy="resample")
    frames = random_video(30, seed=4, height=16, width=16)
    stream.feed(frames)  # 10 pooled frames > 4: resampled
    assert stream.rebuilds == 1 and len(stream.kept_indices) <= 4
    prefix, suffix = stream._split_prompt(QUESTION)
    embed = predictor.model.get_input_embeddings()
    with torch.inference_mode():
        embeds = torch.cat([embed(torch.tensor([prefix])), stream.features().flatten(0, 1)[None],
                            embed(torch.tensor([suffix]))], dim=1)
        ids = []
        for _ in range(4):  # greedy, no cache: the reference
            logits = predictor.model.language_model(inputs_embeds=embeds).logits[0, -1]
            ids.append(int(logits.argmax()))
            embeds = torch.cat([embeds, embed(torch.tensor([[ids[-1]]]))], dim=1)
    reply = stream.ask(QUESTION, max_new_tokens=4)
    assert reply.token_ids and reply.token_ids == ids[:len(reply.token_ids)]


def test_the_mlp_baseline_streams_too(qwen2_mlp_dir):
    predictor = Predictor.from_pretrained(qwen2_mlp_dir, "cpu", "float32")
    frames = random_video(5, seed=6)
    stream = StormStream(predictor)
    stream.feed(frames[:2])
    stream.feed(frames[2:])
    assert stream.ask(QUESTION, max_new_tokens=4).token_ids == _one_shot(predictor, frames, None, 4)[1]
    with pytest.raises(StormError, match="feed: expected uint8"):
        stream.feed(frames.astype(np.float32))


def test_a_failed_append_leaves_a_stream_that_still_answers_as_one_shot(predictor, monkeypatch):
    frames = random_video(12, seed=7)
    stream = StormStream(predictor)
    stream.feed(frames[:5])

    def out_of_memory(embeds):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(stream, "_append", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.feed(frames[5:9])  # encoded, but its tokens never reached the cache
    monkeypatch.undo()
    assert stream.ask(QUESTION, max_new_tokens=4).token_ids == _one_shot(predictor, frames[:9], None, 4)[1]
    stream.feed(frames[9:])
    assert stream.ask(QUESTION, max_new_tokens=4).token_ids == _one_shot(predictor, frames, None, 4)[1]
    assert stream.stats()["cache_tokens"] == len(stream._prefix_ids) + stream.visual_tokens


def test_a_failing_question_leaves_the_stream_as_it_was(predictor, monkeypatch):
    frames = random_video(8, seed=8)
    stream = StormStream(predictor)
    stream.feed(frames)  # 8 frames, k = 3: a partial window is appended for each question
    before = stream.ask(QUESTION, max_new_tokens=4).token_ids
    generate = predictor.model.generate

    def failing(*args, **kwargs):
        generate(*args, **{**kwargs, "max_new_tokens": 2})  # fills the cache with the question, then fails
        raise RuntimeError("generation failed")

    monkeypatch.setattr(predictor.model, "generate", failing)
    with pytest.raises(RuntimeError):
        stream.ask(QUESTION, max_new_tokens=4)
    monkeypatch.undo()
    assert stream.stats()["cache_tokens"] == len(stream._prefix_ids) + stream.visual_tokens
    assert stream.ask(QUESTION, max_new_tokens=4).token_ids == before


def test_questions_are_text(predictor):
    stream = StormStream(predictor)
    stream.feed(random_video(3, seed=9))
    # a typed placeholder is a word, not a second video; text that was not UTF-8 is still a question
    for question in ("What does the <video> tag do?", "Is there an <image>?", "caf\udce9?"):
        assert stream.ask(question, max_new_tokens=2).visual_tokens == 4
