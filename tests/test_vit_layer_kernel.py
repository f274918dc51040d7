"""The fused SigLIP encoder layer (storm_vlm.model.cpu_vit_layer, ssm/_vit_layer_kernel.c) is
transformers' layer within float rounding, on every vector width the CPU runs, for any head count,
width and frame length (none of them whole vectors included), whatever the input's strides; frames
do not affect each other; `_LeanSiglipLayer` takes it only where it applies and is faster; and a
stack of layers in one call (`fast_paths.siglip_stack`, STORM's tower) gives the bits the layers
give one by one."""

import pytest
import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from storm_vlm import StormConfig
from storm_vlm.model import cpu_vit_layer, fast_paths, modeling
from storm_vlm.model.cpu_attention import ATTENTION_KERNEL_ENV
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.perf.profiler import build_random_model
from helpers import KERNEL_ISAS, TINY_CONFIG, use_kernel_library

# (width, heads, MLP width, tokens per frame): the bench tower's, several heads, and widths / lengths
# that are not whole vectors on any instruction set
SHAPES = [(72, 1, 269, 64), (48, 3, 100, 49), (40, 2, 37, 17), (24, 3, 50, 5), (16, 1, 16, 33)]


def _layer(d, heads, inter, seed=0):
    config = SiglipVisionConfig(hidden_size=d, num_attention_heads=heads, intermediate_size=inter)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = SiglipEncoderLayer(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def _lean(layer):
    fast_paths.enable_fast_paths(layer, decode=False)
    assert type(layer) is fast_paths._LeanSiglipLayer
    return layer


def _reference(layer, x):
    """transformers' layer in float64 (a copy), as float64."""
    ref = SiglipEncoderLayer(layer.self_attn.config).double().eval()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        return SiglipEncoderLayer.forward(ref, x.double(), None)


def _fused(lib, layer, x):
    """The fused layer on x, which it must apply to."""
    struct = cpu_vit_layer.fused_layer(layer, x)
    assert struct is not None
    return cpu_vit_layer.vit_layer(lib, struct, x)


def _on_one_and_three_threads(fn):
    """[fn() on 1 torch thread, fn() on 3], without autograd."""
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(fn())
    finally:
        torch.set_num_threads(threads)
    return outs


def _library():
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    return lib


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("d, heads, inter, t", SHAPES)
def test_fused_layer_is_transformers_layer(monkeypatch, isa, d, heads, inter, t):
    lib = use_kernel_library(monkeypatch, isa)
    layer = _layer(d, heads, inter)
    x = torch.randn(3, t, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = _fused(lib, layer, x)
        theirs = SiglipEncoderLayer.forward(layer, x, None)  # float32, as transformers computes it
    exact = _reference(layer, x)
    assert ours.shape == x.shape and ours.is_contiguous()
    # as close to the float64 result as transformers' own float32 layer is, within a small factor
    ours_err = (ours.double() - exact).abs().max()
    theirs_err = (theirs.double() - exact).abs().max()
    assert ours_err <= 4 * theirs_err + 1e-6 * exact.abs().max()


def test_any_input_strides_give_the_same_result():
    """Token-major rows, the patch embedding's feature-major view, and a view with strides neither
    has all read the same values: the same output bit for bit."""
    lib = _library()
    layer = _layer(40, 2, 37)
    x = torch.randn(4, 17, 40, generator=torch.Generator().manual_seed(2))
    feature_major = x.transpose(1, 2).contiguous().transpose(1, 2)
    spread = torch.zeros(4, 17, 80)
    spread[..., ::2] = x
    with torch.no_grad():
        outs = [_fused(lib, layer, v) for v in (x, feature_major, spread[..., ::2])]
    assert feature_major.stride() != x.stride() and spread[..., ::2].stride(-1) == 2
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(x, feature_major)  # the input is only read


def test_frames_are_independent_and_threads_change_nothing():
    """Each frame's output is what it gets alone (a NaN frame stays in its frame), on 1 or 3 threads."""
    lib = _library()
    layer = _layer(24, 3, 50)
    x = torch.randn(6, 5, 24, generator=torch.Generator().manual_seed(3))
    x[2, 1, 4] = float("nan")
    outs = _on_one_and_three_threads(lambda: _fused(lib, layer, x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        alone = [_fused(lib, layer, x[i : i + 1]) for i in (0, 5)]
    assert torch.equal(outs[0][0:1], alone[0]) and torch.equal(outs[0][5:6], alone[1])
    assert outs[0][2].isnan().all() and not outs[0][[0, 1, 3, 4, 5]].isnan().any()


def test_fused_layer_applies_only_to_plain_float32_layers():
    layer = _layer(16, 1, 16)
    x = torch.randn(2, 4, 16)
    assert cpu_vit_layer.fused_layer(layer, x) is not None
    assert cpu_vit_layer.fused_layer(layer, x.double()) is None
    assert cpu_vit_layer.fused_layer(layer, torch.randn(2, 4, 8)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_vit_layer.fused_layer(layer, x) is None
    handle = layer.mlp.fc1.register_forward_hook(lambda *a: None)
    assert cpu_vit_layer.fused_layer(layer, x) is None
    handle.remove()
    assert cpu_vit_layer.fused_layer(layer, x) is not None
    layer.self_attn.k_proj.weight = nn.Parameter(layer.self_attn.k_proj.weight.detach().t().contiguous().t())
    assert cpu_vit_layer.fused_layer(layer, x) is None  # a transposed (non-contiguous) weight


def test_fused_layer_reads_the_parameters_the_layer_has_now():
    """New values written into the parameters are read as they are; parameters replaced (new
    tensors, or new storage behind the same ones) are found again."""
    lib = _library()
    layer = _layer(16, 2, 24)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _fused(lib, layer, x)
        layer.mlp.fc2.bias.add_(1.0)
        layer.self_attn.q_proj.weight = nn.Parameter(torch.randn(16, 16))
        layer.layer_norm2.weight.data = torch.randn(16)
        ref = SiglipEncoderLayer.forward(layer, x, None)
        torch.testing.assert_close(_fused(lib, layer, x), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def calls(monkeypatch):
    """Which path each `_LeanSiglipLayer` call took: "fused" or "separate"."""
    seen = []
    real_fused, real_separate = fast_paths.vit_layer, fast_paths._LeanSiglipLayer._c_passes
    monkeypatch.setattr(fast_paths, "vit_layer", lambda *a: seen.append("fused") or real_fused(*a))
    monkeypatch.setattr(fast_paths._LeanSiglipLayer, "_c_passes",
                        lambda self, *a: seen.append("separate") or real_separate(self, *a))
    monkeypatch.setattr(cpu_vit_layer, "_CHOICE", {})
    monkeypatch.delenv(ATTENTION_KERNEL_ENV, raising=False)
    return seen


def test_lean_layer_takes_the_fused_layer_where_it_is_faster(monkeypatch, calls):
    """Large calls time both paths once per layer shape and keep the faster; small ones take the
    fused layer untimed; STORM_VLM_ATTENTION_KERNEL=1 pins it. Either way: transformers' result."""
    _library()
    layer = _lean(_layer(24, 3, 50))
    x = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = SiglipEncoderLayer.forward(layer, x, None)
        torch.testing.assert_close(layer(x, None), ref, rtol=1e-5, atol=1e-5)
        assert calls == ["fused"] and cpu_vit_layer.vit_layer_choices() == {}  # small: untimed

        monkeypatch.setattr(cpu_vit_layer, "_TIMED_WORK", 1)
        timings = []
        monkeypatch.setattr(cpu_vit_layer, "timed",
                            lambda fns, *rounds: timings.append(sorted(fns)) or {"fused": 2.0, "separate": 1.0})
        calls.clear()
        for _ in range(2):
            torch.testing.assert_close(layer(x, None), ref, rtol=1e-5, atol=1e-5)
        assert timings == [["fused", "separate"]]  # timed once, then remembered
        assert calls == ["separate", "separate"]
        assert cpu_vit_layer.vit_layer_choices() == {(5, 24, 50, 3): "separate"}

        monkeypatch.setenv(ATTENTION_KERNEL_ENV, "1")
        calls.clear()
        torch.testing.assert_close(layer(x, None), ref, rtol=1e-5, atol=1e-5)
        assert calls == ["fused"] and len(timings) == 1


def test_lean_layer_keeps_its_other_paths(monkeypatch, calls):
    """Under bf16 autocast, or with another MLP activation, the layer runs its separate passes; with
    output_attentions, transformers' layer (neither)."""
    _library()
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(5))
    layer = _lean(_layer(24, 3, 50))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, None)
        assert calls == ["separate"]
        layer(x, None, output_attentions=True)
        assert calls == ["separate"]
        layer.mlp.activation_fn = nn.GELU()
        out = layer(x, None)
        assert calls == ["separate", "separate"]
        torch.testing.assert_close(out, SiglipEncoderLayer.forward(layer, x, None), rtol=1e-5, atol=1e-5)


def _stack(n, d=16, heads=2, inter=24):
    """n lean layers of one width, different weights."""
    return [_lean(_layer(d, heads, inter, seed=i)) for i in range(n)]


@pytest.mark.parametrize("frames", [1, 37])  # 37: groups of frames that do not divide it
def test_stack_is_the_layers_one_by_one_bit_for_bit(frames):
    """Each group of frames through every layer before the next group: the same bits as calling the
    layers in turn, on 1 or 3 threads."""
    _library()
    layers = _stack(3)
    x = torch.randn(frames, 9, 16, generator=torch.Generator().manual_seed(7)).transpose(1, 2).contiguous().transpose(1, 2)
    outs = _on_one_and_three_threads(lambda: fast_paths.siglip_stack(layers, x))
    with torch.no_grad():
        h = x
        for layer in layers:
            h = layer(h, None)
    assert outs[0] is not None and torch.equal(outs[0], h) and torch.equal(outs[1], h)


def test_stack_steps_aside_where_a_layer_would_not_take_the_fused_layer(monkeypatch):
    """A hook on a layer, training, autograd, float64, or the timing choosing the separate passes:
    None, and the caller calls the layers (hooks and all)."""
    _library()
    layers = _stack(2)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert fast_paths.siglip_stack(layers, x) is not None
        handle = layers[1].register_forward_hook(lambda *a: None)
        assert fast_paths.siglip_stack(layers, x) is None
        handle.remove()
        layers[0].train()
        assert fast_paths.siglip_stack(layers, x) is None
        layers[0].eval()
        assert fast_paths.siglip_stack(layers, x.double()) is None
        monkeypatch.setattr(fast_paths, "fused_layer_is_faster", lambda *a: False)
        assert fast_paths.siglip_stack(layers, x) is None
    assert fast_paths.siglip_stack(layers[:1], x) is None  # autograd on: not inference


def test_storm_tower_runs_its_layers_as_one_stack(monkeypatch):
    """StormForConditionalGeneration's tower takes the stack up to `vision_feature_layer` (the same
    features as its layers one by one)."""
    _library()
    model = build_random_model(StormConfig(**TINY_CONFIG), seed=0)
    stacks = []
    real = modeling.siglip_stack
    monkeypatch.setattr(modeling, "siglip_stack", lambda layers, h: stacks.append(len(layers)) or real(layers, h))
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        stacked = model._vision_features(frames)
        monkeypatch.setattr(modeling, "siglip_stack", lambda *a: None)
        one_by_one = model._vision_features(frames)
    layers = model.vision_tower.encoder.layers
    wanted = model.config.vision_feature_layer % (len(layers) + 1)
    assert stacks == [wanted] and torch.equal(stacked, one_by_one)
