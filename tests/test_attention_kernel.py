"""The CPU paths built on ssm/_attention_kernel.c (storm_vlm.model.cpu_attention) change no result
beyond float rounding: the vision tower's C LayerNorm (with its residual add) and per-frame
attention on every vector width the CPU runs, under bf16 autocast too; the LLM's causal
grouped-query prefill attention, taken only where it applies."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from storm_vlm import StormConfig
from storm_vlm.model import cpu_attention, fast_paths
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.perf.profiler import build_random_model
from helpers import TINY_CONFIG as TINY
from helpers import KERNEL_ISAS, use_kernel_library

ISAS = KERNEL_ISAS


@pytest.fixture(scope="module")
def model():
    return build_random_model(StormConfig(**TINY), seed=0)


def _sdpa(q, k, v, heads, scale):
    b, length, width = q.shape
    q, k, v = (t.reshape(b, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, length, width)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,length,heads,hd", [(4, 64, 1, 72), (3, 7, 2, 5), (2, 33, 3, 16), (1, 130, 2, 20),
                                               (2, 1, 1, 3), (1, 70, 1, 100)])
def test_frame_attention_is_sdpa(monkeypatch, isa, b, length, heads, hd):
    """Lengths and head sizes off the vector width (tails of keys and of value columns), one key,
    a last block of fewer than four query rows; q/k/v as three tensors and as column slices of
    one: as close to the float64 result as SDPA's float32 is. Equal scores of ~1e5 (where a softmax
    without its max subtracted overflows): the mean of the values."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(length * 100 + hd)
    scale = hd ** -0.5
    fused = torch.randn(b, length, 3 * heads * hd, generator=g) * 2
    q, k, v = fused.split(heads * hd, dim=-1)
    exact = _sdpa(q.double(), k.double(), v.double(), heads, scale)
    sdpa_error = (_sdpa(q, k, v, heads, scale) - exact).abs().max()
    for args in ((q, k, v), tuple(t.contiguous() for t in (q, k, v))):
        out = cpu_attention.frame_attention(lib, *args, heads, scale)
        assert out.shape == q.shape and out.dtype == torch.float32
        assert (out - exact).abs().max() <= 4 * sdpa_error + 1e-6
    big = torch.full_like(q, 300.0)
    out = cpu_attention.frame_attention(lib, big, big, v, heads, scale)
    torch.testing.assert_close(out, v.mean(dim=1, keepdim=True).expand_as(v), rtol=1e-5, atol=1e-5)
    q = q.contiguous()
    q[0, 0] = float("nan")  # a NaN query row: NaN out for that row alone, as the math kernel (and eager
    out = cpu_attention.frame_attention(lib, q, k, v, heads, scale)  # attention) give; CPU flash writes 0
    with sdpa_kernel(SDPBackend.MATH):
        ref = _sdpa(q, k, v, heads, scale)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width", [1, 15, 16, 72, 75])
def test_layer_norm_is_torch_layer_norm(monkeypatch, isa, width):
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(width)
    norm = nn.LayerNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        x = torch.randn(3, 11, width, generator=g) * 5 + 3
        res = torch.randn(3, 11, width, generator=g)
        torch.testing.assert_close(cpu_attention.c_layer_norm(lib, x.clone(), norm), norm(x), rtol=1e-5, atol=2e-5)
        stream = x.clone()
        out = cpu_attention.c_layer_norm(lib, stream, norm, residual=res)
        torch.testing.assert_close(out, norm(x + res), rtol=1e-5, atol=2e-5)
        assert torch.equal(stream, x + res)  # the residual stream, written in place


def test_kernels_refuse_tensors_they_would_overrun():
    """The C kernels address their arrays through raw pointers: a bf16 input among float32 ones (half
    the bytes), a residual, weight or output of another size, a strided row, KV heads that do not
    divide the query heads are a ValueError, never a read or write outside the buffers."""
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    norm = nn.LayerNorm(8)
    x = torch.randn(4, 8)
    with torch.no_grad():
        for bad in ({"x": x.bfloat16()}, {"x": x, "residual": torch.randn(4, 7)}, {"x": x, "residual": x.bfloat16()},
                    {"x": torch.randn(8, 4).t()}):
            with pytest.raises(ValueError, match="c_layer_norm"):
                cpu_attention.c_layer_norm(lib, bad["x"], norm, residual=bad.get("residual"))
        with pytest.raises(ValueError, match="c_rms_norm"):
            cpu_attention.c_rms_norm(lib, x, torch.ones(16), 1e-6)
        torch.testing.assert_close(cpu_attention.c_layer_norm(lib, x.clone(), norm), norm(x), rtol=1e-5, atol=2e-5)
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    for args in ((q, kv.bfloat16(), kv, torch.empty_like(q)), (q, kv, kv, torch.empty(1, 4, 5, 4)),
                 (q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), torch.empty_like(q))):
        with pytest.raises(ValueError, match="c_attention"):
            cpu_attention.c_attention(lib, *args, scale=1.0, causal=False)


@pytest.mark.parametrize("winner", ["c", "sdpa"])
def test_attention_takes_the_faster_of_c_and_sdpa_timed_once_per_shape(monkeypatch, winner):
    """Calls big enough are timed against PyTorch's SDPA once per shape class, and the winner runs
    (SDPA only when `_SDPA_MARGIN` faster): frames and a causal prompt alike, the result SDPA's within
    float rounding either way; smaller calls and STORM_VLM_ATTENTION_KERNEL=1 take C untimed."""
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv(cpu_attention.ATTENTION_KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_attention, "_ATTENTION_CHOICE", {})
    monkeypatch.setattr(cpu_attention, "_TIMED_WORK", 50_000)
    timings, c_calls = [], []
    times = {"c": 1.0, "sdpa": 0.5 if winner == "sdpa" else 0.9}  # 0.9: faster, not by the margin
    monkeypatch.setattr(cpu_attention, "timed", lambda fns: timings.append(sorted(fns)) or times)
    real_c = cpu_attention.c_attention
    monkeypatch.setattr(cpu_attention, "c_attention", lambda *a, **k: c_calls.append(1) or real_c(*a, **k))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(6, 40, 2 * 16, generator=g) for _ in range(3))  # 6 frames of 40, 2 heads of 16
    exact = _sdpa(q.double(), k.double(), v.double(), 2, 0.25)
    for _ in range(2):
        out = cpu_attention.frame_attention(lib, q, k, v, 2, 0.25)
        assert (out - exact).abs().max() < 1e-5
    assert timings == [["c", "sdpa"]] and bool(c_calls) == (winner == "c")
    qp = torch.randn(1, 4, 90, 16, generator=g)  # a causal prompt: 4 heads on 2 KV heads
    kp, vp = torch.randn(1, 2, 90, 16, generator=g), torch.randn(1, 2, 90, 16, generator=g)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    c_calls.clear()
    with torch.inference_mode():
        out, _ = cpu_attention.storm_sdpa_attention(module, qp, kp, vp, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=0.25, enable_gqa=True)
    assert (out - ref.transpose(1, 2)).abs().max() < 1e-5 and bool(c_calls) == (winner == "c")
    assert len(timings) == 2 and len(cpu_attention.attention_choices()) == 2
    assert cpu_attention.c_attention_is_faster(lib, qp, kp, vp, 0.25, causal=True) == (winner == "c")
    small = [t[:1, :, :8] for t in (qp, kp, vp)]  # under _TIMED_WORK: C, untimed
    assert cpu_attention.c_attention_is_faster(lib, *small, 0.25, causal=True) and len(timings) == 2
    monkeypatch.setenv(cpu_attention.ATTENTION_KERNEL_ENV, "1")
    monkeypatch.setattr(cpu_attention, "_ATTENTION_CHOICE", {})
    assert cpu_attention.c_attention_is_faster(lib, qp, kp, vp, 0.25, causal=True) and len(timings) == 2


def test_thread_split_changes_no_bit(monkeypatch):
    """Frames (attention) and rows (norm) spread over 3 threads give one thread's result exactly."""
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_attention, "_ATTENTION_WORK", 1)
    monkeypatch.setattr(cpu_attention, "_LN_ELEMENTS", 1)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(7, 20, 24, generator=g) for _ in range(3))
    norm = nn.LayerNorm(24)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append((cpu_attention.frame_attention(lib, q, k, v, 2, 0.3),
                                cpu_attention.c_layer_norm(lib, q.clone(), norm, residual=k)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _layers(model):
    layers = model.vision_tower.encoder.layers
    assert all(type(layer) is fast_paths._LeanSiglipLayer for layer in layers)
    return layers


def _separate_passes(monkeypatch):
    """Make SigLIP layers run their separate C passes (what they run where the fused layer of
    cpu_vit_layer is the slower, as at real widths), not the fused layer."""
    monkeypatch.setattr(fast_paths, "fused_layer_is_faster", lambda *a: False)


@pytest.mark.parametrize("fused", [True, False], ids=["fused layer", "separate passes"])
@pytest.mark.parametrize("isa", [*ISAS, None], ids=[*ISAS, "no kernels"])
def test_lean_layer_is_transformers_layer(model, monkeypatch, isa, fused):
    """Through the C kernels (the fused layer or the separate passes): transformers' result within
    float rounding; without them: bit for bit."""
    if isa is None:
        monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
    else:
        use_kernel_library(monkeypatch, isa)
    if not fused:
        _separate_passes(monkeypatch)
    h = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        for layer in _layers(model):
            ours = layer(h, None)
            ref = SiglipEncoderLayer.forward(layer, h, None)
            if isa is None:
                assert torch.equal(ours, ref)
            else:
                torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            h = ref


@pytest.mark.parametrize("kernels", [True, False], ids=["C kernels", "no kernels"])
def test_lean_layer_under_bf16_autocast(model, monkeypatch, kernels):
    """The residual stream stays float32 as in transformers' layer (a bf16 branch output joins it in
    float32); without the C kernels the result is transformers' bit for bit, with them as close to
    the float32 layer as transformers' own autocast result is."""
    if kernels:
        if cpu_kernel.load_library() is None:
            pytest.skip("no C compiler")
    else:
        monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
    h = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(13))
    for layer in _layers(model):
        with torch.inference_mode():
            exact = SiglipEncoderLayer.forward(layer, h, None)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours, ref = layer(h, None), SiglipEncoderLayer.forward(layer, h, None)
        assert ours.dtype == ref.dtype == torch.float32
        if kernels:
            assert (ours - exact).abs().max() <= 2 * (ref - exact).abs().max()
        else:
            assert torch.equal(ours, ref)
        h = exact


def test_lean_layer_takes_the_kernels_with_inert_keyword_arguments_only(model, monkeypatch):
    """Towers pass keyword arguments down (transformers' `output_hidden_states`, LLaVA-OneVision's
    `vision_aspect_ratio`): those keep the C path; any other (e.g. `output_attentions`) takes
    transformers' layer, bit for bit."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    _separate_passes(monkeypatch)
    calls = []
    real = fast_paths.frame_attention
    monkeypatch.setattr(fast_paths, "frame_attention", lambda *a: calls.append(1) or real(*a))
    layer = _layers(model)[0]
    h = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(14))
    with torch.inference_mode():
        layer(h, None, output_hidden_states=True, vision_aspect_ratio="anyres_max_9")
        assert calls == [1]
        ours = layer(h, None, output_attentions=True)
        assert calls == [1]
        assert torch.equal(ours, SiglipEncoderLayer.forward(layer, h, None))


def test_lean_layer_projects_qkv_as_one_product_unless_a_projection_is_hooked(model, monkeypatch):
    """q, k, v come from one product of the three weights side by side, with transformers' result; a
    hook on a projection (an adapter, a probe) makes the layer call the projections themselves, and
    the hook sees its output."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    _separate_passes(monkeypatch)
    layer = _layers(model)[0]
    attn = layer.self_attn
    products = []
    real = fast_paths.measured_linear
    monkeypatch.setattr(fast_paths, "measured_linear", lambda x, w, b: products.append(w.shape) or real(x, w, b))
    h = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(15))
    seen = []
    with torch.inference_mode():
        ref = SiglipEncoderLayer.forward(layer, h, None)
        fused = layer(h, None)
        assert products == [torch.Size([48, 16])]
        handle = attn.k_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        try:
            hooked = layer(h, None)
        finally:
            handle.remove()
    assert products == [torch.Size([48, 16])] and seen == [torch.Size([3, 16, 16])]
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,heads,kv_heads,length,hd", [(2, 6, 2, 37, 20), (1, 7, 1, 130, 32), (1, 4, 4, 5, 8),
                                                        (1, 2, 1, 1, 16), (2, 3, 1, 70, 40)])
def test_causal_grouped_attention_is_sdpa(monkeypatch, isa, b, heads, kv_heads, length, hd):
    """The LLM's prefill case: causal, grouped-query heads (and plain multi-head), q and out as the
    transposed (B, L, H, hd) views the model hands over; as close to float64 as SDPA's float32."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(length + hd)
    q = torch.randn(b, length, heads, hd, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, kv_heads, length, hd, generator=g) for _ in range(2))
    scale = hd ** -0.5

    def sdpa(*t):
        return F.scaled_dot_product_attention(*t, is_causal=True, scale=scale, enable_gqa=True)

    exact = sdpa(q.double(), k.double(), v.double())
    out = torch.full((b, length, heads, hd), float("nan"))
    cpu_attention.c_attention(lib, q, k, v, out.transpose(1, 2), scale, causal=True)
    error = (out.transpose(1, 2) - exact).abs().max()
    assert error <= 4 * (sdpa(q, k, v) - exact).abs().max() + 1e-6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("causal", [False, True], ids=["every key", "causal"])
@pytest.mark.parametrize("length,hd", [(45, 24), (33, 7), (1, 72)])
def test_bfloat16_attention_is_as_close_as_sdpa(monkeypatch, isa, causal, length, hd):
    """bf16 in and out (what q/k/v are under autocast): no further from the float64 result than
    SDPA's own bf16 kernel, plus one bf16 rounding of the output. Widened, it is the float32 kernel's
    result rounded once as torch rounds; in the avx512bf16 build's dot products (odd head sizes and
    key counts: pairs completed with zeros), the float64 attention whose probabilities are rounded
    to bf16 before the value product, within one bf16 rounding."""
    lib = use_kernel_library(monkeypatch, isa)
    dot = isa == "avx512bf16"
    g = torch.Generator().manual_seed(21 + length)
    q = torch.randn(2, length, 6, hd, generator=g).bfloat16().transpose(1, 2)
    k, v = (torch.randn(2, 2, length, hd, generator=g).bfloat16() for _ in range(2))
    scale = hd ** -0.5

    def sdpa(*t):
        return F.scaled_dot_product_attention(*t, is_causal=causal, scale=scale, enable_gqa=True)

    exact = sdpa(q.double(), k.double(), v.double())
    out = torch.empty(2, length, 6, hd, dtype=torch.bfloat16)
    cpu_attention.c_attention(lib, q, k, v, out.transpose(1, 2), scale, causal=causal)
    out = out.transpose(1, 2).double()
    assert (out - exact).abs().max() <= (sdpa(q, k, v).double() - exact).abs().max() + 2 ** -8 * exact.abs().max()
    if dot:
        s = (q.double() @ k.double().repeat_interleave(3, dim=1).transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        e = (s - s.amax(-1, keepdim=True)).exp()
        ref = (e.float().bfloat16().double() @ v.double().repeat_interleave(3, dim=1)) / e.sum(-1, keepdim=True)
        torch.testing.assert_close(out, ref, rtol=2 ** -8, atol=1e-4)
    else:
        rounded = torch.empty(2, length, 6, hd)
        cpu_attention.c_attention(lib, q.float(), k.float(), v.float(), rounded.transpose(1, 2), scale, causal=causal)
        assert torch.equal(out, rounded.transpose(1, 2).bfloat16().double())  # float32 inside, rounded once
    q = q.clone()
    q[0, 0, -1, 0] = float("nan")  # a NaN query row: NaN out for that row alone, as eager attention gives
    nan_out = torch.empty(2, length, 6, hd, dtype=torch.bfloat16)
    cpu_attention.c_attention(lib, q, k, v, nan_out.transpose(1, 2), scale, causal=causal)
    nan_out = nan_out.transpose(1, 2).double()
    assert nan_out[0, 0, -1].isnan().all() and not nan_out[0, 0, :-1].isnan().any()
    assert torch.equal(nan_out[1], out[1]) and torch.equal(nan_out[0, 1:], out[0, 1:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("length,keys", [(5, 23), (17, 40), (2, 2), (33, 100)])
def test_causal_attention_after_a_cache(monkeypatch, isa, length, keys):
    """`length` queries after `keys - length` cached positions: SDPA with the causal mask of that
    offset, as transformers builds it for a prompt continuing a cache."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(length * keys)
    q = torch.randn(2, length, 6, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 2, keys, 16, generator=g) for _ in range(2))
    mask = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    assert cpu_attention.continues_cache(mask.expand(2, 1, length, keys), length, keys)

    def sdpa(*t):
        return F.scaled_dot_product_attention(*t, attn_mask=mask, scale=0.25, enable_gqa=True)

    exact = sdpa(q.double(), k.double(), v.double())
    out = torch.empty(2, length, 6, 16)
    cpu_attention.c_attention(lib, q, k, v, out.transpose(1, 2), 0.25, causal=True)
    assert (out.transpose(1, 2) - exact).abs().max() <= 4 * (sdpa(q, k, v) - exact).abs().max() + 1e-6


def test_only_the_exact_continuation_mask_is_dropped():
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4)
    assert cpu_attention.continues_cache(mask[None, None], 3, 7)
    padded = mask.expand(2, 1, 3, 7).clone()
    padded[1, 0, :, 0] = False  # a padded first position in row 1
    assert not cpu_attention.continues_cache(padded, 3, 7)
    assert not cpu_attention.continues_cache(mask[None, None].float(), 3, 7)  # an additive float mask
    assert not cpu_attention.continues_cache(torch.ones(1, 1, 3, 7, dtype=torch.bool), 3, 7)  # not causal
    assert not cpu_attention.continues_cache(mask[None, None], 3, 8)  # other key count


def _logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_llm_prefill_takes_the_kernel_only_where_it_applies(model, monkeypatch):
    """A causal prompt, from the start or continuing a cache, runs the C attention, with the logits
    of PyTorch's SDPA; a padded batch (a mask) and autograd take transformers' SDPA."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    calls = []
    real = cpu_attention.c_attention
    monkeypatch.setattr(cpu_attention, "c_attention", lambda *a, **k: calls.append(k["causal"]) or real(*a, **k))
    ids = torch.randint(0, 60, (2, 23), generator=torch.Generator().manual_seed(12))
    fast = _logits(model, ids)
    assert calls == [True] * model.config.text_config.num_hidden_layers
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
        plain = _logits(model, ids)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)

    calls.clear()  # under bf16 autocast (bf16 q/k/v): the kernel too, as close to float32 as SDPA's bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_bf16 = _logits(model, ids)
        assert calls == [True] * model.config.text_config.num_hidden_layers
        with monkeypatch.context() as m:
            m.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
            plain_bf16 = _logits(model, ids)
    assert (fast_bf16 - plain).abs().max() <= 2 * (plain_bf16 - plain).abs().max()

    calls.clear()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    _logits(model, ids, attention_mask=mask)
    assert calls == []
    with torch.inference_mode():  # 13 tokens after a cache of 10: the kernel, with the logits of one pass
        cache = model(input_ids=ids[:, :10], use_cache=True).past_key_values
        calls.clear()
        continued = model(input_ids=ids[:, 10:], past_key_values=cache, use_cache=True).logits
    assert calls == [True] * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(continued, plain[:, 10:], rtol=1e-5, atol=1e-5)
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert calls == []
    model.zero_grad(set_to_none=True)


def test_attention_kernel_switch_keeps_transformers_computation(model, monkeypatch):
    """STORM_VLM_ATTENTION_KERNEL=0: the vision layers bit for bit transformers', the LLM prefill on SDPA."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    calls = []
    real = cpu_attention.c_attention
    monkeypatch.setattr(cpu_attention, "c_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("STORM_VLM_ATTENTION_KERNEL", "off")
    layer = _layers(model)[0]
    h = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(15))
    with torch.inference_mode():
        assert torch.equal(layer(h, None), SiglipEncoderLayer.forward(layer, h, None))
        model(input_ids=torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(16)))
    assert calls == []
