"""benchmarks/peers.py: STORM and transformers' LLaVA-OneVision / LLaVA-NeXT-Video build at the same
(tiny) widths and run the benchmark end to end."""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from storm_vlm.model.fast_paths import language_model_of
from storm_vlm.precision import resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_peer_models_build_at_the_same_widths_and_run():
    fields, text_tokens = peers.storm_config(tiny=True, config_path=None)
    models = peers.build_models(fields)
    storm, onevision, nextvideo = models["storm"], models["llava-onevision"], models["llava-next-video"]
    vision = storm.config.vision_config
    for peer in (onevision, nextvideo):
        cfg = peer.config
        assert cfg.text_config.hidden_size == storm.config.text_config.hidden_size
        assert cfg.vision_config.hidden_size == vision.hidden_size
        # the peers' towers stop where STORM's does (vision_feature_layer -2 of 2 layers: after 1)
        assert cfg.vision_config.num_hidden_layers == vision.num_hidden_layers - 1
        # the same CPU kernels: their LLM (in `peer.model`) takes STORM's attention too
        assert peer.model.language_model.config._attn_implementation == "storm_sdpa"
    pixels = torch.randn(1, 4, 3, vision.image_size, vision.image_size)
    text = torch.randint(0, 50, (1, text_tokens))
    clock = peers.Clock("cpu", "wall")
    tokens = {}
    for name in peers.MODELS:
        r = peers.measure(models, name, pixels, text, 2, clock)
        assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0
        tokens[name] = r["visual_tokens"]
    per_frame = storm.config.tokens_per_frame
    assert tokens["storm"] == 4 * per_frame and tokens["storm pool4"] == per_frame
    assert tokens["llava-onevision"] == 4 * per_frame + 1  # 2x2-pooled patches + one newline token
    assert tokens["llava-next-video"] == 4 * per_frame


def test_peer_models_are_set_up_for_the_precision_alike():
    """Under the bfloat16 precision every model's LLM linear layers, LM head included (LLaVA keeps
    it outside its language model), are stored in bf16 and everything else stays float32, as the
    loaders set STORM up; each model runs under the precision's autocast."""
    fields, text_tokens = peers.storm_config(tiny=True, config_path=None)
    precision = resolve_precision("bfloat16", "cpu")
    models = peers.build_models(fields, precision=precision)
    for name, model in models.items():
        lm = language_model_of(model)
        llm = {id(m) for m in lm.modules()} | {id(model.get_output_embeddings())}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert model.get_output_embeddings().weight.dtype == torch.bfloat16, name
        for m in linears:
            assert m.weight.dtype == (torch.bfloat16 if id(m) in llm else torch.float32), name
        assert lm.get_input_embeddings().weight.dtype == torch.float32
    vision = models["storm"].config.vision_config
    pixels = torch.randn(1, 4, 3, vision.image_size, vision.image_size)
    text = torch.randint(0, 50, (1, text_tokens))
    for name in ("storm pool4", "llava-onevision"):
        r = peers.measure(models, name, pixels, text, 1, peers.Clock("cpu", "wall"), precision=precision)
        assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0


def test_peer_benchmark_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "peers"
    code = peers.main(["--tiny", "--frames", "2,4", "--repeats", "1", "--guard-repeats", "2", "--decode-tokens", "1",
                       "--output", str(out), "--no-guards"])
    assert code == 0
    result = json.loads((out / "peers.json").read_text())
    assert {r["model"] for r in result["rows"]} == set(peers.MODELS) | {"storm (forward)"}
    assert len(result["rows"]) == 2 * 6 and result["guard_frames"] == 4
    assert set(result["guards"]) == {"storm_none_vs_onevision", "onevision_vs_storm_pool4"}
    # each guard pairs the two models' times of the same round, then takes the median over rounds
    rounds = result["guard_rounds_ttft_ms"]
    assert len(rounds["storm"]) == 2
    ratios = [a / b for a, b in zip(rounds["storm"], rounds["llava-onevision"])]
    assert result["guards"]["storm_none_vs_onevision"]["ratio"] == round(statistics.median(ratios), 3)
    assert result["host"]["cpu"] and "load_average_end" in result
    allowed = result["guards"]["onevision_vs_storm_pool4"]["vision_ms_allowed"]
    assert allowed == round(peers.tower_allowance(result["rows"], 4), 3)
    assert (out / "peers.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "host:" in printed and "load average at end" in printed and "guard at 4 frames" in printed


def test_tower_allowance_is_where_the_pool4_guard_ratio_reaches_its_limit():
    rows = [{"frames": 128, "model": "llava-onevision", "projector_ms": 10.0, "llm_prefill_ms": 990.0},
            {"frames": 128, "model": "storm pool4", "projector_ms": 50.0, "llm_prefill_ms": 150.0},
            {"frames": 32, "model": "storm pool4", "projector_ms": 1.0, "llm_prefill_ms": 1.0}]
    allowed = peers.tower_allowance(rows, 128)
    assert (allowed + 1000.0) / (allowed + 200.0) == pytest.approx(peers.GUARD_SPEEDUP)
    rows[1]["llm_prefill_ms"] = 400.0  # OneVision's rest only 2.2x STORM pool 4's: no tower time is enough
    assert peers.tower_allowance(rows, 128) < 0
