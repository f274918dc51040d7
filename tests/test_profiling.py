"""The profiler on a tiny random model: rows, JSON, table, PNGs, skipping, the CLI."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from storm_vlm import StormConfig
from storm_vlm.cli import main
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, parse_compressions
from storm_vlm.perf.host import l2_cache_bytes
from storm_vlm.errors import StormError
from storm_vlm.perf.profiler import (
    ROW_FIELDS,
    ProfileSettings,
    build_random_model,
    load_model_config,
    profile_model,
)
from storm_vlm.perf.report import format_table, plot_profile, write_profile
from helpers import TINY_CONFIG as TINY


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model():
    return build_random_model(StormConfig(**TINY), seed=0)


def _settings(**kw):
    base = dict(frames=[2, 8], compressions=list(DEFAULT_COMPRESSIONS.values()), repeats=2, warmup=1,
                decode_tokens=3, text_tokens=6)
    base.update(kw)
    return ProfileSettings(**base)


def test_profile_rows_json_table_and_plots(tiny_model, tmp_path):
    result = profile_model(tiny_model, _settings(), source="tiny", progress=False)
    rows = result["rows"]
    assert [(r["frames"], r["compression"]) for r in rows] == [(f, c) for c in (1, 4, 8) for f in (2, 8)]
    cfg = tiny_model.config
    assert cfg.temporal_pool_size == 1  # the profiler restores the model's pooling
    for r in rows:
        assert not r.get("skipped"), r
        for key in ROW_FIELDS:
            assert isinstance(r[key], (int, float)) and r[key] >= 0, (key, r)
        comp = DEFAULT_COMPRESSIONS[r["compression"]]
        counter = StormConfig(**{**TINY, "temporal_pool_size": comp.temporal_pool})
        assert r["visual_tokens"] == counter.num_visual_tokens(r["frames"], temporal_sample_stride=comp.temporal_sample)
        assert r["kv_cache_tokens"] == r["visual_tokens"] + 6
        assert r["total_ms"] == pytest.approx(
            r["vision_tower_ms"] + r["projector_ms"] + r["llm_prefill_ms"] + 3 * r["decode_ms_per_token"], abs=0.01
        )
        assert r["vision_tower_ms"] > 0 and r["llm_prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["peak_memory_mb"] >= r["memory_baseline_mb"] > 0
        assert len(r["samples_ms"]["llm_prefill"]) == 2 and r["samples_ms"]["decode_steps"] == 2 * 3
    # 8 frames: none 8 x 4 tokens, pool 4 -> 2 frames, pool 4 + sample 2 -> 1 frame
    assert [r["visual_tokens"] for r in rows if r["frames"] == 8] == [32, 8, 4]
    assert result["settings"]["repeats"] == 2 and result["settings"]["device"] == "cpu"
    assert result["host"]["cpu"] and "torch_threads" in result["host"] and "blas" in result["host"]
    assert result["model"]["parameters"]["projector"] > 0

    path = write_profile(result, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["rows"] == json.loads(json.dumps(rows))
    table = format_table(result)
    lines = table.splitlines()
    assert "vision_tower" in lines[1] and "projector" in lines[1] and "llm" in lines[1]
    assert len(lines) == 3 + len(rows)
    first = rows[0]
    assert f"{first['vision_tower_ms']:.1f}" in lines[3] and "%" in lines[3]
    assert (tmp_path / "profile.txt").read_text().strip() == table
    pngs = plot_profile(result, tmp_path)
    assert sorted(p.name for p in pngs) == ["breakdown.png", "latency_vs_frames.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_profiled_path_is_the_models_forward(tiny_model):
    """The features the profiler times are the model's: same as forward() with placeholders."""
    cfg = tiny_model.config
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 8, 3, 32, 32, generator=gen)
    with torch.no_grad():
        feats, _ = tiny_model.get_video_features(pixels, temporal_sample_stride=2)
        n = cfg.num_visual_tokens(8, temporal_sample_stride=2)
        assert feats.shape[:3].numel() == n
        text = torch.randint(0, 60, (1, 4), generator=gen)
        ids = torch.cat([text[:, :2], torch.full((1, n), cfg.video_token_id), text[:, 2:]], dim=1)
        ref = tiny_model(input_ids=ids, pixel_values_videos=pixels, temporal_sample_stride=2).logits[:, -1]
        emb = tiny_model.get_input_embeddings()(text)
        inputs = torch.cat([emb[:, :2], feats.reshape(1, n, -1), emb[:, 2:]], dim=1)
        ours = tiny_model(inputs_embeds=inputs, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(ours, ref)


def test_rows_that_do_not_fit_are_skipped(tiny_model, tmp_path):
    settings = _settings(frames=[2], compressions=parse_compressions("1"), max_memory_gb=1e-9)
    result = profile_model(tiny_model, settings, progress=False)
    (row,) = result["rows"]
    assert row["skipped"] and "exceeds" in row["note"]
    assert row["vision_tower_ms"] is None and row["visual_tokens"] == 8
    assert row["note"] in format_table(result)
    assert len(plot_profile(result, tmp_path)) == 2  # plots still written (empty)


def test_cli_with_config_and_model_dir(tmp_path, capsys, qwen2_mamba_dir):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": TINY, "profile": {"text_tokens": 4, "decode_tokens": 2}}))
    config, defaults = load_model_config(cfg_path)
    assert config.text_config.hidden_size == 32 and defaults["decode_tokens"] == 2
    out = tmp_path / "out"
    code = main(["profile", "--config", str(cfg_path), "--frames", "4", "--compression", "1,4",
                 "--repeats", "1", "--warmup", "0", "--output", str(out), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "vision_tower" in printed and "profile.json" in printed
    result = json.loads((out / "profile.json").read_text())
    assert [(r["frames"], r["compression"], r["visual_tokens"]) for r in result["rows"]] == [(4, 1, 16), (4, 4, 4)]
    assert result["settings"]["decode_tokens"] == 2 and result["rows"][0]["kv_cache_tokens"] == 16 + 4
    assert (out / "latency_vs_frames.png").read_bytes()[:8] == PNG_MAGIC

    # a saved model folder goes through the project's loader (storm_vlm.inference.load_model);
    # --dtype fp32 is a spelling of --precision float32
    out2 = tmp_path / "out2"
    assert main(["profile", str(qwen2_mamba_dir), "--frames", "2", "--compression", "8", "--repeats", "1",
                 "--decode-tokens", "1", "--output", str(out2), "--no-plots", "--dtype", "fp32"]) == 0
    result = json.loads((out2 / "profile.json").read_text())
    (row,) = result["rows"]
    assert result["settings"]["precision"] == "float32"
    assert row["compression"] == 8 and row["visual_tokens"] == 16  # 2 frames -> 1 pooled frame -> 1 sampled
    assert not (out2 / "breakdown.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--frames", "4"], "exactly one of MODEL_DIR or --config"),
    (["--config", "{cfg}", "--compression", "3"], "no default mapping for 3"),
    (["--config", "{cfg}", "--frames", "0,4"], "--frames"),
    (["--config", "{missing}"], "cannot read"),
    (["{missing}"], "does not exist"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": TINY}))
    argv = [a.format(cfg=cfg_path, missing=tmp_path / "nope") for a in argv]
    assert main(["profile", *argv, "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "profile.json").exists()


def test_cli_cpu_clock_needs_one_thread(tmp_path, capsys, monkeypatch):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": TINY}))
    argv = ["profile", "--config", str(cfg_path), "--device", "cpu", "--clock", "cpu", "--output", str(tmp_path / "o")]
    before = torch.get_num_threads()
    assert main([*argv, "--threads", "2"]) == 2
    assert "--clock cpu needs one torch thread (--threads 1); this run would use 2" in capsys.readouterr().err
    assert torch.get_num_threads() == before
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert main(argv) == 2
    assert "this run would use 4 (torch default)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "profile.json").exists()


def test_prefill_video_and_decode_latency(tiny_model):
    from storm_vlm.perf.profiler import decode_latency, prefill_video

    settings = _settings(text_tokens=6)
    comp = DEFAULT_COMPRESSIONS[4]
    cache, token = prefill_video(tiny_model, 8, comp, settings)
    assert cache.get_seq_length() == tiny_model.config.num_visual_tokens(8) // 4 + 6 == 14
    assert tiny_model.config.temporal_pool_size == 1
    times = decode_latency(tiny_model, cache, token, 5, settings)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert cache.get_seq_length() == 14  # cropped back for the next round


def test_rows_report_module_flops_and_rates(tiny_model):
    from storm_vlm.perf.costmodel import pipeline_cost

    row = profile_model(tiny_model, _settings(frames=[4], compressions=[DEFAULT_COMPRESSIONS[4]], repeats=1),
                        progress=False)["rows"][0]
    est = pipeline_cost(tiny_model.config, 4, DEFAULT_COMPRESSIONS[4], 6, causal=True)  # as the model computes it
    assert row["gflop"]["llm_prefill"] == pytest.approx(est.llm_prefill.flops / 1e9, rel=1e-4)
    assert row["gflop_per_s"]["vision_tower"] == pytest.approx(
        est.vision_tower.flops / row["vision_tower_ms"] / 1e6, rel=1e-2)
    assert row["page_faults"] >= 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_cpu_allocator_stops_page_faults_of_reused_memory():
    # In a fresh process: with glibc's defaults, freeing a few large tensors leaves a heap top above
    # the trim threshold, which is handed back to the kernel, so the next ones fault in (and zero)
    # every 4 KiB page again (~5,000 faults per round); after tuning, freed blocks are reused.
    code = textwrap.dedent("""
        import json, torch
        from storm_vlm.perf.allocator import tune_cpu_allocator
        from storm_vlm.perf.host import page_faults
        def faults():
            for _ in range(2):  # warm
                a, b, c = torch.ones(2 * 2**20), torch.ones(2 * 2**20), torch.ones(2**20)
                del a, b, c
            f = page_faults()
            for _ in range(20):
                a, b, c = torch.ones(2 * 2**20), torch.ones(2 * 2**20), torch.ones(2**20)
                del a, b, c
            return page_faults() - f
        before = faults()
        state = tune_cpu_allocator()
        print(json.dumps({"before": before, "after": faults(), "state": state, "again": tune_cpu_allocator()}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["state"]["tuned"] and res["state"]["mmap_threshold"] == 32 * 2**20
    assert res["again"] == res["state"]  # idempotent
    # (how many faults the defaults give depends on glibc's dynamic thresholds, usually ~100,000; after
    # tuning it is ~0, unless the kernel reclaims idle heap pages meanwhile, e.g. DAMON on a shared host)
    assert res["after"] * 10 < max(res["before"], 2000), res


def test_measure_cpu_roofline():
    from storm_vlm.perf.host import measure_cpu_roofline

    hw = measure_cpu_roofline(matmul_size=128, stream_mb=8, repeats=2)
    assert 1e8 < hw.peak_flops < 1e14 and 1e8 < hw.bandwidth < 1e13 and hw.mfu == 1.0


def test_cpu_time_clock(tiny_model):
    result = profile_model(tiny_model, _settings(frames=[2], compressions=[DEFAULT_COMPRESSIONS[1]], repeats=1,
                                                 clock="cpu"), progress=False)
    assert result["timer"].startswith("time.process_time")
    row = result["rows"][0]
    assert row["vision_tower_ms"] > 0 and row["decode_ms_per_token"] > 0
    with pytest.raises(StormError, match="--clock"):
        _settings(clock="gpu").validate()


def test_l2_cache_size_from_sysfs(tmp_path):
    def index(n, level, kind, size):
        d = tmp_path / f"index{n}"
        d.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(f"{text}\n")

    (tmp_path / "empty").mkdir()
    assert l2_cache_bytes(str(tmp_path / "empty")) is None
    index(0, 1, "Data", "32K")
    index(1, 1, "Instruction", "32K")
    index(2, 2, "Unified", "2048K")
    index(3, 3, "Unified", "32768K")
    assert l2_cache_bytes(str(tmp_path / "missing")) is None
    assert l2_cache_bytes(str(tmp_path)) == 2 * 2**20
