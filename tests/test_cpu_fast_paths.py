"""The CPU speed-ups of StormForConditionalGeneration change no result: StormKVCache (in-place KV
appends), the grouped-query single-token attention ("storm_sdpa"), the vision tower's
sigmoid-form tanh-GELU and the LLM's one-pass SiLU gate and RMSNorm."""

import copy

import pytest
import torch
from transformers.activations import GELUTanh
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from storm_vlm import StormConfig
from storm_vlm.model.fast_paths import STORM_SDPA, _GELUTanhCPU, _Qwen2MLPCPU, _Qwen2RMSNormCPU
from storm_vlm.model.kv_cache import GrowingKVLayer, StormKVCache
from storm_vlm.model import fast_paths, kv_cache
from storm_vlm.model.matmul_backend import use_measured_linears
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, cpu_kernel
from storm_vlm.perf.profiling import build_random_model
from helpers import TINY_CONFIG as TINY
from helpers import KERNEL_ISAS, use_kernel_library


@pytest.fixture(scope="module")
def model():
    return build_random_model(StormConfig(**TINY), seed=0)


def _kv(n, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, n, 8, generator=g), torch.randn(batch, 2, n, 8, generator=g)


def test_growing_cache_holds_what_dynamic_cache_holds(model):
    cfg = model.config.text_config
    ours, ref = StormKVCache(config=cfg), DynamicCache(config=cfg)
    assert all(type(layer) is GrowingKVLayer for layer in ours.layers)

    def step(n, seed):
        for layer in range(2):
            k, v = _kv(n, seed + layer)
            got, want = ours.update(k, v, layer), ref.update(k, v, layer)
            for a, b in zip(got, want):
                assert a.shape == b.shape and torch.equal(a, b)

    step(5, 0)  # prefill
    buf = ours.layers[0]._key_buf
    for i in range(140):  # past the first capacity (5 + 128): one re-growth
        step(1, 10 + i)
    assert ours.layers[0]._key_buf is not buf and ours.get_seq_length() == ref.get_seq_length() == 145
    ours.crop(-7), ref.crop(-7)  # the dropped tokens are overwritten by the next appends
    step(3, 500)
    idx = torch.tensor([1])
    ours.batch_select_indices(idx), ref.batch_select_indices(idx)  # replaced tensors are re-adopted
    for layer in range(2):
        k, v = _kv(2, 900 + layer, batch=1)
        for a, b in zip(ours.update(k, v, layer), ref.update(k, v, layer)):
            assert torch.equal(a, b)
    assert ours.get_seq_length() == 143


def test_growing_cache_falls_back_to_concatenation_under_autograd(model):
    cache = StormKVCache(config=model.config.text_config)
    k, v = _kv(4, 0)
    k.requires_grad_(True)
    keys, _ = cache.update(k, v, 0)
    keys, _ = cache.update(k, v, 0)
    keys.sum().backward()
    assert torch.equal(k.grad, torch.full_like(k, 2.0))


def test_model_picks_the_fast_parts_and_they_change_no_logit(model):
    assert model.language_model.config._attn_implementation == STORM_SDPA
    assert model.vision_tower.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 60, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        assert isinstance(out.cache, StormKVCache)
        ref = DynamicCache(config=model.config.text_config)
        model(input_ids=ids, cache=ref, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        fast = [model(input_ids=tok, cache=out.cache, use_cache=True).logits for _ in range(3)]
        model.set_attn_implementation("sdpa")
        try:
            assert model.language_model.config._attn_implementation == "sdpa"
            plain = [model(input_ids=tok, cache=ref, use_cache=True).logits for _ in range(3)]
        finally:
            model.set_attn_implementation(STORM_SDPA)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_output_is_unchanged(model, beams):
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=beams,
              attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        fast = model.generate(ids, **kw)
        model.set_attn_implementation("sdpa")
        try:
            plain = model.generate(ids, cache=DynamicCache(config=model.config.text_config), **kw)
        finally:
            model.set_attn_implementation(STORM_SDPA)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("isa", [*KERNEL_ISAS, None], ids=[*KERNEL_ISAS, "tensor passes"])
def test_sigmoid_form_gelu_is_the_tanh_gelu(model, monkeypatch, isa):
    """float32 and bfloat16 (what the vision tower runs under bf16 autocast), through each vector
    width of the C kernel the CPU runs, and without it; ragged sizes; inf, NaN and both tails."""
    if isa is None:
        monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
    lib = None if isa is None else use_kernel_library(monkeypatch, isa)
    x = torch.randn(4, 64, 269, generator=torch.Generator().manual_seed(3)) * 4
    x[0, 0, :8] = torch.tensor([0.0, -30.0, 30.0, 1e-8, -1e4, 1e4, float("inf"), float("nan")])
    act, ref = _GELUTanhCPU(), GELUTanh()
    with torch.inference_mode():
        torch.testing.assert_close(act(x), ref(x), rtol=1e-5, atol=2e-6, equal_nan=True)
        torch.testing.assert_close(act(x.double()), ref(x.double()), rtol=1e-12, atol=1e-12, equal_nan=True)
        # bf16: one rounding step of bf16 at most (and below 1e-6 in the far negative tail, where the tanh
        # form cancels to 0)
        out = act(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref(x.bfloat16()).float(), rtol=2 ** -7, atol=1e-6, equal_nan=True)
        if lib is not None:  # the float32 result, rounded as torch rounds
            torch.testing.assert_close(out, act(x.bfloat16().float()).bfloat16(), rtol=0, atol=0, equal_nan=True)
        for n in (1, 17, 100_003):  # vector tails
            torch.testing.assert_close(act(x.flatten()[:n]), ref(x.flatten()[:n]), rtol=1e-5, atol=2e-6,
                                       equal_nan=True)
    x.requires_grad_(True)  # training: the original op (and its gradient)
    act(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=0, atol=0, equal_nan=True)


def test_one_pass_gelu_over_threads_equals_one_thread():
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    x = torch.randn(3, 200_001, generator=torch.Generator().manual_seed(1))
    act, threads = _GELUTanhCPU(), torch.get_num_threads()
    with torch.inference_mode():
        try:
            torch.set_num_threads(1)
            one = act(x)
            torch.set_num_threads(3)  # three chunks of whole vectors, two of them on the pool's threads
            assert torch.equal(act(x), one)
        finally:
            torch.set_num_threads(threads)


def test_vision_tower_uses_it_and_features_are_unchanged(model):
    acts = [m for m in model.vision_tower.modules() if isinstance(m, (GELUTanh, _GELUTanhCPU))]
    assert acts and all(type(m) is _GELUTanhCPU for m in acts)
    pixels = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast, _ = model.get_video_features(pixels)
        for layer in model.vision_tower.encoder.layers:
            layer.mlp.activation_fn = GELUTanh()
        try:
            plain, _ = model.get_video_features(pixels)
        finally:
            for layer in model.vision_tower.encoder.layers:
                layer.mlp.activation_fn = _GELUTanhCPU()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("width", [1, 17, 64])
def test_gated_mlp_and_rms_norm_are_transformers(model, monkeypatch, isa, width):
    """The LLM's MLP (silu(gate) · up in one C pass, in place) and RMSNorm (one C pass per row) on each
    vector width: transformers' result within float rounding in float32, ragged widths (vector tails);
    under bf16 autocast the MLP's gate is the float32 result rounded once, as close to float32 as
    transformers' two bf16 passes; with autograd, transformers' computation and gradients."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(width)
    cfg = model.config.text_config
    mlp, norm = Qwen2MLP(cfg), Qwen2RMSNorm(cfg.hidden_size, eps=1e-6)
    with torch.no_grad():
        for p in (*mlp.parameters(), norm.weight):
            p.normal_(generator=g)
    mlp.gate_proj.out_features = mlp.up_proj.out_features = width  # ragged activation widths
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight = torch.nn.Parameter(proj.weight[:width].clone())
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :width].clone())
    x = torch.randn(3, 11, cfg.hidden_size, generator=g) * 3
    with torch.inference_mode():
        ref_mlp, ref_norm = mlp(x), norm(x)
        mlp.__class__, norm.__class__ = _Qwen2MLPCPU, _Qwen2RMSNormCPU
        calls = []
        real = lib.storm_silu_mul_f32
        monkeypatch.setattr(lib, "storm_silu_mul_f32", lambda *a: calls.append(a) or real(*a))
        torch.testing.assert_close(mlp(x), ref_mlp, rtol=1e-5, atol=1e-5)
        assert calls  # the C pass ran
        torch.testing.assert_close(norm(x), ref_norm, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16 = mlp(x)
            mlp.__class__ = Qwen2MLP
            plain_bf16 = mlp(x)
            mlp.__class__ = _Qwen2MLPCPU
        assert (fast_bf16.float() - ref_mlp).abs().max() <= 1.5 * (plain_bf16.float() - ref_mlp).abs().max()
        gu = torch.randn(2, 3, width, generator=g).bfloat16(), torch.randn(2, 3, width, generator=g).bfloat16()
        out = fast_paths._one_pass(lib.storm_silu_mul_bf16, *gu)
        want = (torch.nn.functional.silu(gu[0].float()) * gu[1].float()).bfloat16()
        torch.testing.assert_close(out, want, rtol=0, atol=0)  # float32 math, rounded once
    x.requires_grad_(True)
    for module, ref in ((mlp, ref_mlp), (norm, ref_norm)):
        y = module(x)
        assert y.requires_grad
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_llm_takes_the_one_pass_gate_and_norm(model, monkeypatch):
    """Every Qwen2 MLP and RMSNorm of the LLM runs the C passes; the logits are transformers' (float
    rounding), and with STORM_VLM_ATTENTION_KERNEL=0 the norms are transformers' own."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    lm = model.language_model
    mods = [m for m in lm.modules() if isinstance(m, (Qwen2MLP, Qwen2RMSNorm))]
    assert mods and all(type(m) in (_Qwen2MLPCPU, _Qwen2RMSNormCPU) for m in mods)
    ids = torch.randint(0, 60, (2, 19), generator=torch.Generator().manual_seed(21))
    with torch.inference_mode():
        fast = model(input_ids=ids).logits
        with monkeypatch.context() as m:
            m.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
            plain = model(input_ids=ids).logits
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        norm = next(m for m in mods if type(m) is _Qwen2RMSNormCPU)
        h = torch.randn(4, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(22))
        monkeypatch.setenv("STORM_VLM_ATTENTION_KERNEL", "0")
        assert torch.equal(norm(h), Qwen2RMSNorm.forward(norm, h))


def test_real_frames_reach_the_tower_as_views_and_features_match_the_masked_path(model):
    pixels = torch.randn(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    seen = []
    hook = model.vision_tower.embeddings.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    old = model.config.vision_batch_size
    model.config.vision_batch_size = 2
    try:
        with torch.inference_mode():
            plain, _ = model.get_video_features(pixels)
            seen_plain = list(seen)
            padded = torch.cat([pixels, torch.zeros(1, 2, 3, 32, 32)], dim=1)
            mask = torch.tensor([[True] * 5 + [False] * 2])
            masked, out_mask = model.get_video_features(padded, mask)
    finally:
        model.config.vision_batch_size = old
        hook.remove()
    assert [x.shape[0] for x in seen_plain] == [1, 2, 2]  # at most 2 per call, evened out
    assert seen_plain[0].data_ptr() == pixels.data_ptr()  # no copy of the pixels
    assert out_mask.tolist() == mask.tolist()
    torch.testing.assert_close(masked[:, :5], plain, rtol=1e-5, atol=1e-5)


def test_growing_cache_keeps_data_it_is_built_with(model):
    k, v = _kv(3, 7)
    for cfg in (None, model.config.text_config):
        cache = StormKVCache([(k, v), (k, v)], config=cfg)
        assert all(type(layer) is GrowingKVLayer for layer in cache.layers)
        assert cache.get_seq_length() == 3 and torch.equal(cache.layers[1].keys, k)
        k2, v2 = _kv(1, 8)
        keys, values = cache.update(k2, v2, 0)
        assert torch.equal(keys, torch.cat([k, k2], dim=-2)) and torch.equal(values, torch.cat([v, v2], dim=-2))
    lazy = StormKVCache()
    lazy.update(k, v, 0)
    assert type(lazy.layers[0]) is GrowingKVLayer


def test_keys_are_kept_in_the_autocast_dtype(model, monkeypatch):
    """Under bf16 autocast the rotary embedding hands float32 keys to the cache beside bf16 values;
    the attention casts them to bf16 before reading. Kept in bf16 they take half the bytes, and a
    prefill plus decode steps through the model's forward give bitwise the logits of float32 keys."""
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: the masked attention path too

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            fast_paths.enable_fast_paths(model, decode=False)  # the model's own forward at every step
            try:
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                logits, cache, m = [out.logits], out.cache, mask
                for _ in range(3):
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=m, cache=cache, use_cache=True)
                    logits.append(out.logits)
            finally:
                fast_paths.enable_fast_paths(model)
        return logits, cache

    logits, cache = run()
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} == {
        torch.bfloat16}
    monkeypatch.setattr(kv_cache, "keys_as_attention_reads_them", lambda k, v: k)  # the keys stay float32
    ref_logits, ref_cache = run()
    assert {layer.keys.dtype for layer in ref_cache.layers} == {torch.float32}
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)


def _one_calls(monkeypatch) -> list:
    """(reverse, added into the other direction's output) of every one-call mixer direction."""
    calls = []
    real = cpu_kernel.mixer_direction
    monkeypatch.setattr(cpu_kernel, "mixer_direction",
                        lambda *a, **k: calls.append((a[-2], a[-1] is not None)) or real(*a, **k))
    return calls


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("cls,d_model,batch,length", [(BiMambaMixer, 20, 2, 150), (MambaMixer, 24, 3, 64),
                                                      (BiMambaMixer, 224, 1, 70)])
def test_mixer_direction_in_one_call_equals_the_separate_kernels(monkeypatch, isa, cls, d_model, batch, length):
    """A projector mixer's direction as one C call (`_OneCallDirections`) gives the separate conv,
    x_proj and scan kernels' output bit for bit (x_proj pinned to the C product kernel), the
    backward direction added onto the forward one's in the kernel, on every build: partial vectors
    (d_inner 40 and 48), a partial last time tile, batches, both directions, a conv without bias."""
    use_kernel_library(monkeypatch, isa)
    monkeypatch.setenv("STORM_VLM_MATMUL", "storm")
    calls = _one_calls(monkeypatch)
    torch.manual_seed(0)
    separate = cls(d_model, conv_bias=d_model != 24)
    use_measured_linears(separate)
    one_call = copy.deepcopy(separate)
    fast_paths._one_call_mixers(one_call)
    x = torch.randn(batch, length, d_model)
    with torch.inference_mode():
        want, got = separate(x), one_call(x)
    assert calls == ([(False, False), (True, True)] if cls is BiMambaMixer else [(False, False)])
    assert torch.equal(got, want)


def test_mixer_direction_in_one_call_steps_aside(monkeypatch):
    """Where the one call does not apply, the mixer's own path runs: padding (a mask), a carried state,
    autograd, two intra-op threads, more than 512 inner channels."""
    calls = _one_calls(monkeypatch)
    torch.manual_seed(0)
    bi, causal, wide = BiMambaMixer(20), MambaMixer(20), MambaMixer(288)
    for m in (bi, causal, wide):
        fast_paths._one_call_mixers(m)
    x = torch.randn(2, 30, 20)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.inference_mode():
        bi(x, mask)
        causal(x, return_state=True)
        wide(torch.randn(1, 30, 288))
    bi(x).sum().backward()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            bi(x)
    finally:
        torch.set_num_threads(threads)
    assert calls == [] and bi.in_proj.weight.grad is not None
    if cpu_kernel.load() is not None:
        with torch.inference_mode():
            bi(x)
        assert len(calls) == 2


def test_storm_projector_mixers_take_the_one_call_path(model):
    """The model turns the path on for its own projector (`enable_fast_paths`)."""
    mixers = [layer.mixer for layer in model.projector.layers]
    assert mixers and all(isinstance(m, fast_paths._OneCallDirections) for m in mixers)


@pytest.mark.parametrize("shape", [(0, 5, 20), (2, 0, 20)])
def test_mixers_take_an_empty_batch_or_sequence(shape):
    """No videos or no tokens: an empty output from the separate kernels and from the one call."""
    x = torch.randn(*shape)
    for cls in (BiMambaMixer, MambaMixer):
        separate = cls(20)
        one_call = copy.deepcopy(separate)
        fast_paths._one_call_mixers(one_call)
        with torch.inference_mode():
            assert separate(x).shape == one_call(x).shape == x.shape
