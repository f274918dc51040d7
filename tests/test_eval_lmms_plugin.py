"""The lmms-eval adapter: plain functions always; the real lmms-eval API (its registry, `Instance`,
`lmms` base class and model_args parser) when it imports, with a tiny STORM model."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from storm_vlm.eval import lmms_plugin
from storm_vlm.eval.lmms_plugin import (DEFAULT_MAX_NEW_TOKENS, cut_at_stops, generation_kwargs,
                                        visuals_to_frames)
from storm_vlm.inference import build_messages

from test_eval_fixtures import write_mp4


def require_lmms_eval():
    """Skip unless lmms-eval's API imports (installed without its dependencies it does not: loguru)."""
    pytest.importorskip("lmms_eval.api.model", reason="lmms-eval's API does not import here")


def test_video_paths_become_sampled_frames(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", num_frames=6, size=32)
    frames = visuals_to_frames([str(path)], num_frames=4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert frames[0].mean() < frames[-1].mean()  # the fixture brightens frame by frame
    two = visuals_to_frames([[str(path), str(path)]], num_frames=4)
    assert two.shape == (4, 32, 32, 3)  # 2 frames from each of the two videos


def test_images_become_frames_in_order_resized_to_the_first():
    imgs = [Image.new("RGB", (20, 10), (i * 50, 0, 0)) for i in range(3)] + [Image.new("RGB", (8, 8), (9, 9, 9))]
    frames = visuals_to_frames(imgs, num_frames=32)
    assert frames.shape == (4, 10, 20, 3)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 50, 100, 9]


def test_videos_of_different_sizes_folders_and_long_frame_lists(tmp_path):
    small, large = write_mp4(tmp_path / "s.mp4", size=32), write_mp4(tmp_path / "l.mp4", size=48)
    assert visuals_to_frames([str(small), str(large)], num_frames=4).shape == (4, 32, 32, 3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (16, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    frames = visuals_to_frames([str(folder)], num_frames=4)  # a folder of frames, as llava_vid reads one
    assert frames.shape == (4, 8, 16, 3) and [int(f[0, 0, 0]) for f in frames] == [0, 60, 120, 180]
    # MVBench's frame subsets give every frame as an image: num_frames of them, spread uniformly
    imgs = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(100)]
    frames = visuals_to_frames(imgs, num_frames=5)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 25, 50, 74, 99]


def test_requests_without_visuals_are_refused():
    with pytest.raises(ValueError, match="no visual input"):
        visuals_to_frames([], num_frames=4)
    with pytest.raises(ValueError, match="no visual input"):
        visuals_to_frames(None, num_frames=4)


def test_generation_kwargs_are_greedy_unless_sampling_is_asked():
    kw, stops = generation_kwargs({"max_new_tokens": 32, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                   "do_sample": False, "until": ["\n\n"], "image_aspect_ratio": "pad"})
    assert kw == {"max_new_tokens": 32, "do_sample": False, "num_beams": 1} and stops == ["\n\n"]
    kw, stops = generation_kwargs({"until": "###"}, default_max_new_tokens=7)
    assert kw["max_new_tokens"] == 7 and kw["do_sample"] is False and stops == ["###"]
    kw, _ = generation_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert kw["do_sample"] is True and kw["temperature"] == 0.7 and kw["top_p"] == 0.9
    # lmms-eval's models sample at a temperature above 0 unless do_sample says otherwise
    assert generation_kwargs({"temperature": 0.2})[0]["do_sample"] is True
    assert generation_kwargs({"do_sample": True})[0]["do_sample"] is True
    assert generation_kwargs({"do_sample": True, "temperature": 0})[0]["do_sample"] is False
    # yaml nulls are the defaults
    kw, stops = generation_kwargs({"temperature": None, "num_beams": None, "max_new_tokens": None, "until": None})
    assert kw == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "num_beams": 1} and stops == []
    with pytest.raises(ValueError, match="until"):
        generation_kwargs({"until": 5})


def test_tasks_without_max_new_tokens_get_the_llava_models_default():
    """lmms-eval gives a task without generation_kwargs only until and do_sample (NExT-QA, TempCompass,
    VideoMMMU): a short cap would cut their open-ended answers."""
    kw, stops = generation_kwargs({"until": ["\n\n"], "do_sample": False})
    assert kw["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS == 1024 and stops == ["\n\n"]


def test_cut_at_stops():
    assert cut_at_stops("B. red\n\nmore", ["\n\n", "###"]) == "B. red"
    assert cut_at_stops("B", []) == "B"


def test_module_imports_without_lmms_eval_and_says_how_to_install():
    if lmms_plugin.HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval is installed here")
    with pytest.raises(ImportError, match=r"storm-vlm\[lmms\]"):
        lmms_plugin.Storm(pretrained="x")
    with pytest.raises(ImportError, match=r"storm-vlm\[lmms\]"):
        lmms_plugin.manifest()


def test_entry_point_payload_registers_with_the_real_lmms_eval_registry():
    require_lmms_eval()
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    for m in registry._coerce_payload_to_manifests(lmms_plugin.manifest):  # what the entry point names
        registry.register_manifest(m, overwrite=True)
    cls = registry.get_model_class("storm")
    assert cls is lmms_plugin.Storm and issubclass(cls, lmms) and cls.is_simple


def test_lmms_eval_finds_storm_through_the_installed_entry_point():
    require_lmms_eval()
    from lmms_eval.models import get_model

    assert get_model("storm") is lmms_plugin.Storm


# ---- the model through lmms-eval's API, with a tiny STORM ------------------------------------------


def instance(request_type, args):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": args[4], "doc_id": args[3], "repeats": 1})


@pytest.fixture(scope="module")
def lm(qwen2_mamba_dir):
    """Storm built as lmms-eval builds it: the --model_args string plus the evaluator's own arguments."""
    require_lmms_eval()
    from storm_vlm.eval.lmms_plugin import Storm

    return Storm.create_from_arg_string(
        f"pretrained={qwen2_mamba_dir},num_frames=2,fps=None,temporal_sample_stride=none,max_new_tokens=4,"
        "device=cpu,dtype=float32", {"batch_size": 1, "max_batch_size": None, "device": None})


def test_model_args_as_lmms_eval_parses_them(lm, qwen2_mamba_dir):
    from storm_vlm.eval.lmms_plugin import Storm

    assert (lm.num_frames, lm.fps, lm.default_max_new_tokens) == (2, None, 4)
    assert lm.predictor.temporal_sample_stride is None and lm.device == torch.device("cpu")
    assert (lm.rank, lm.world_size) == (0, 1)
    with pytest.raises(TypeError, match="num_frame"):  # a misspelt argument must not run with the default
        Storm.create_from_arg_string(f"pretrained={qwen2_mamba_dir},num_frame=8")
    with pytest.raises(ValueError, match="batch_size"):
        Storm.create_from_arg_string(f"pretrained={qwen2_mamba_dir}", {"batch_size": "auto"})


def test_each_rank_answers_every_request_it_is_given(lm, tmp_path, monkeypatch):
    """Each rank's model is on its own GPU (storm_vlm.inference.resolve_device: cuda:LOCAL_RANK)."""
    # the evaluator gives each rank its shard and sets rank / world size: every request is answered
    lm._rank, lm._world_size = 1, 2
    try:
        video = str(write_mp4(tmp_path / "v.mp4"))
        lm.task_dict = {"toy": {"test": [{"video": video}] * 3}}
        reqs = [instance("generate_until", ("Q?", {"max_new_tokens": 1}, lambda d: [d["video"]], i, "toy", "test"))
                for i in range(3)]
        assert len(lm.generate_until(reqs)) == 3
    finally:
        lm._rank, lm._world_size = 0, 1


def test_generate_until_answers_in_order_and_goes_on_after_an_unreadable_video(lm, tmp_path):
    """Replies in request order, each as the predictor gives it alone (gen_kwargs applied, cut at
    `until`); an unreadable video is answered "" (and not cached), as llava_vid goes on."""
    good, other = write_mp4(tmp_path / "a.mp4"), write_mp4(tmp_path / "b.mp4", num_frames=4, size=48)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    lm.task_dict = {"toy": {"test": [{"video": str(good)}, {"video": str(broken)}, {"video": str(other)}]}}
    cached = []
    lm.cache_hook = type("Hook", (), {"add_partial": lambda self, *a: cached.append(a)})()
    gen = [{"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}, {"max_new_tokens": 3},
           {"max_new_tokens": 2, "do_sample": False, "num_beams": 1, "until": "zz", "image_aspect_ratio": "pad"}]
    reqs = [instance("generate_until", (f"Question {i}?", gen[i], lambda d: [d["video"]], i, "toy", "test"))
            for i in range(3)]
    replies = lm.generate_until(reqs)
    expected = []
    for i, path in ((0, good), (2, other)):
        frames = visuals_to_frames([str(path)], 2, None, lm.predictor.processor.image_size)
        kw, stops = generation_kwargs(gen[i])
        expected.append(cut_at_stops(lm.predictor.reply(f"Question {i}?", frames, **kw), stops))
    assert replies == [expected[0], "", expected[1]]
    assert [c[1][0] for c in cached] == ["Question 0?", "Question 2?"]


def test_loglikelihood_is_the_mean_continuation_loss_lmms_eval_takes_the_lowest_of(lm, tmp_path):
    """lmms-eval's models return the language-model loss over the continuation (mean negative
    log-likelihood per token, computed here directly with labels) and its multiple-choice scoring
    takes the option with the lowest value: the most likely option must have it."""
    video = str(write_mp4(tmp_path / "v.mp4"))
    lm.task_dict = {"toy": {"test": [{"video": video}]}}
    pred = lm.predictor
    frames = visuals_to_frames([video], 2, None, pred.processor.image_size)
    inputs = pred.encode(pred.render(build_messages("What happens?")), [frames])
    with torch.inference_mode():
        first = pred.model(**inputs).logits[0, -1].argmax().item()
    likely, unlikely = pred.tokenizer.decode([first]), pred.tokenizer.decode([(first + 7) % 50])
    options = [likely, unlikely, unlikely + " then"]  # the last: a mean over 2 tokens, not a sum
    assert [len(pred.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options] == [1, 1, 2]
    reqs = [instance("loglikelihood", ("What happens?", o, lambda d: [d["video"]], 0, "toy", "test")) for o in options]
    results = lm.loglikelihood(reqs)
    for option, (loss, _) in zip(options, results):
        cont = pred.tokenizer(option, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"], cont], 1)
        labels = ids.clone()
        labels[:, : inputs["input_ids"].shape[1]] = -100
        with torch.inference_mode():
            direct = pred.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                labels=labels).loss.item()
        assert loss == pytest.approx(direct, rel=1e-4) and loss > 0
    assert results[0][0] < results[1][0]  # lmms-eval picks the lowest: the greedy token, not the other
    assert [greedy for _, greedy in results[:2]] == [True, False]


def test_loglikelihood_of_an_unreadable_video_is_the_worst_score(lm, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    lm.task_dict = {"toy": {"test": [{"video": str(broken), "answer": " A"}]}}
    req = instance("loglikelihood", ("Which?", lambda d: d["answer"], lambda d: [d["video"]], 0, "toy", "test"))
    ((loss, greedy),) = lm.loglikelihood([req])
    assert math.isinf(loss) and loss > 0 and greedy is False
