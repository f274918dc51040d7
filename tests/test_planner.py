"""The token-budget planner (`storm_vlm.planner`, `storm-vlm plan`) and its use by `chat` and the
server: choices respect the context and count tokens as the model does; a request with more frames
than fit gets the planner's stride instead of an error, and says so."""

import json
import shutil

import pytest
from helpers import heavy_imports, random_video, write_mp4

from storm_vlm.cli import main
from storm_vlm.errors import StormError
from storm_vlm.perf.costmodel import real_config
from storm_vlm.planner import fit_stride, frame_candidates, plan


@pytest.mark.parametrize("pool,context", [(1, 32768), (4, 32768), (4, 8192)])
def test_choices_respect_the_context_and_match_num_visual_tokens(pool, context):
    config = real_config(temporal_pool_size=pool)
    result = plan(config, context, minutes=60, text_tokens=100, answer_tokens=200)
    assert result.options and result.chosen is not None
    for o in result.options:
        assert o.visual_tokens == config.num_visual_tokens(o.frames, o.sample_stride)
        assert o.total_tokens == o.visual_tokens + 300
        assert o.fits == (o.total_tokens <= context)
        assert (o.temporal_pool, o.spatial_pool) == (pool, 1)  # the trained pooling only
        assert o.prefill_s > 0 and o.memory_bytes > o.kv_bytes > 0
    chosen = result.chosen
    assert chosen.fits
    fitting = [o for o in result.options if o.fits]
    assert chosen.frames == max(o.frames for o in fitting)
    assert chosen.sample_stride == min(o.sample_stride for o in fitting if o.frames == chosen.frames)
    assert max(o.frames for o in result.options) == min(1024, 60 * 60 * 2)


def test_a_prefill_budget_and_a_short_video_limit_the_pick():
    config = real_config(temporal_pool_size=4)
    free = plan(config, 32768, minutes=60)
    bounded = plan(config, 32768, minutes=60, max_prefill_s=free.chosen.prefill_s / 2)
    assert bounded.chosen.prefill_s <= free.chosen.prefill_s / 2 and bounded.chosen.frames < free.chosen.frames
    assert frame_candidates(0.5, max_fps=2.0) == [8, 16, 32, 60]  # 30 s at 2 fps at most
    assert plan(config, 100, minutes=60).chosen is None  # nothing fits 100 positions


def test_fit_stride_is_the_smallest_that_fits():
    config = real_config(temporal_pool_size=4)  # 64 tokens per input frame
    assert fit_stride(config, [256], 1000, context=32768) == 1  # 16384 + 1000 fit
    assert fit_stride(config, [1024], 1000, context=32768) == 3  # 65536 / s + 1000 <= 32768
    assert fit_stride(config, [1024], 1000, stride=5, context=32768) == 5  # never below the one asked for
    assert fit_stride(config, [512, 512], 1000, context=32768) == 3  # every video counts
    with pytest.raises(StormError, match="does not fit"):
        fit_stride(config, [1024], 32000, context=32768)


def test_plan_command(qwen2_mamba_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(qwen2_mamba_dir), "--context", "2048", "--minutes", "10",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    chosen = data["chosen"]
    assert "**picked**" in printed and f"picked: {chosen['frames']} frames" in printed
    # 16 tokens per frame: 1024 frames need 2048 tokens even at s=8; 512 at s=8 take 1024 + 384
    assert chosen["total_tokens"] <= 2048 and (chosen["frames"], chosen["sample_stride"]) == (512, 8)
    assert main(["plan", "--model", str(qwen2_mamba_dir), "--temporal-pool", "4"]) == 2
    assert "go with --real-size" in capsys.readouterr().err


def test_a_context_past_the_models_positions_is_refused(capsys):
    config = real_config()  # Qwen2-7B: max_position_embeddings 32768
    assert plan(config, 32768, minutes=1).context == 32768
    with pytest.raises(StormError, match=r"--context 65536 .*max_position_embeddings 32768"):
        plan(config, 65536, minutes=1)
    assert main(["plan", "--real-size", "--context", "1000000", "--minutes", "1"]) == 2
    err = capsys.readouterr().err
    assert "--context 1000000" in err and "max_position_embeddings 32768" in err


@pytest.mark.parametrize("flag", [["--bandwidth-gbs", "inf"], ["--peak-tflops", "nan"], ["--mfu", "0"]])
def test_hardware_figures_must_be_finite_and_positive(flag, capsys):
    assert main(["plan", "--real-size", "--context", "32768", "--minutes", "60", *flag]) == 2
    assert "must be finite numbers > 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["plan", "--help"], ["watch", "--help"]])
def test_help_imports_no_torch(argv):
    assert heavy_imports(argv, ("torch", "transformers", "av", "numpy")) == []


@pytest.fixture(scope="module")
def small_context_dir(qwen2_mamba_dir, tmp_path_factory):
    """The tiny model with an LLM of 1024 positions (16 visual tokens per frame)."""
    path = tmp_path_factory.mktemp("small-context") / "model"
    shutil.copytree(qwen2_mamba_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1024
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_engine_applies_the_planners_stride(small_context_dir):
    from storm_vlm.inference import build_messages
    from storm_vlm.serve.engine import StormEngine

    engine = StormEngine(small_context_dir, device="cpu", precision="float32", max_batch_size=1)
    try:
        sampling = engine.check_sampling(4)
        fits = engine.prepare(build_messages("What colour?"), [32], sampling)
        assert (fits.stride, fits.planned) == (None, False)  # 512 visual tokens fit
        prepared = engine.prepare(build_messages("What colour?"), [80], sampling)
        assert prepared.planned and prepared.stride == 2 and prepared.visual_tokens == 640
        completion = engine.submit(prepared, [random_video(80, 16, 16)]).result()
        assert completion.temporal_sample_stride == 2 and completion.stride_planned
        assert completion.visual_tokens == 640
    finally:
        engine.close()


def test_chat_applies_the_planners_stride(small_context_dir, tmp_path, capsys):
    video = write_mp4(tmp_path / "clip.mp4", random_video(64, 32, 32, seed=5))
    # 64 frames x 16 tokens = 1024 > 1024 - room for the text: sampling s=2
    assert main(["chat", str(small_context_dir), str(video), "-q", "What colour?", "--frames", "64",
                 "--max-new-tokens", "2", "--precision", "float32", "--device", "cpu"]) == 0
    assert "s=2 applied, 512 visual tokens" in capsys.readouterr().err
