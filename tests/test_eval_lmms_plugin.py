"""The lmms-eval adapter: plain functions always; the real lmms-eval API when it is installed."""

import numpy as np
import pytest
from PIL import Image

from storm_vlm.eval import lmms_plugin
from storm_vlm.eval.lmms_plugin import cut_at_stops, generation_kwargs, visuals_to_frames

from test_eval_fixtures import write_mp4


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


def test_requests_without_visuals_are_refused():
    with pytest.raises(ValueError, match="no visual input"):
        visuals_to_frames([], num_frames=4)
    with pytest.raises(ValueError, match="no visual input"):
        visuals_to_frames(None, num_frames=4)


def test_generation_kwargs_are_greedy_unless_sampling_is_asked():
    kw, stops = generation_kwargs({"max_new_tokens": 32, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                   "do_sample": False, "until": ["\n\n"]})
    assert kw == {"max_new_tokens": 32, "do_sample": False, "num_beams": 1} and stops == ["\n\n"]
    kw, stops = generation_kwargs({"until": "###"}, default_max_new_tokens=7)
    assert kw["max_new_tokens"] == 7 and kw["do_sample"] is False and stops == ["###"]
    kw, _ = generation_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert kw["do_sample"] is True and kw["temperature"] == 0.7 and kw["top_p"] == 0.9


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
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    for m in registry._coerce_payload_to_manifests(lmms_plugin.manifest):  # what the entry point names
        registry.register_manifest(m, overwrite=True)
    cls = registry.get_model_class("storm")
    assert cls is lmms_plugin.Storm and issubclass(cls, lmms) and cls.is_simple


def test_lmms_eval_finds_storm_through_the_installed_entry_point():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    assert get_model("storm") is lmms_plugin.Storm
