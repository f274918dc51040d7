"""`storm_vlm.perf.costmodel` against independent counts on the built modules.

Matrix products: torch's `FlopCounterMode` (attention through SDPA's math path, whose products it
sees; the C attention kernel and the oneDNN matmul choice are switched off). What it cannot see is
counted op by op from the PyTorch definitions: the selective scan (`selective_scan_reference`), the
depthwise conv (`_depthwise_conv`) and the pooling means. Decode bytes: the weights and KV-cache
entries a step reads, recorded as it runs. Small widths, the real models' proportions.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from storm_vlm import StormConfig, StormForConditionalGeneration
from storm_vlm.model.cpu_attention import attention_library
from storm_vlm.model import fast_paths
from storm_vlm.model.fast_paths import enable_fast_paths
from storm_vlm.model.ssm import mixer
from storm_vlm.model.ssm import scan as scan_module
from storm_vlm.model.ssm.fast_scan import project_delta
from storm_vlm.perf.costmodel import (
    decode_cost,
    gemm_shapes,
    kv_bytes_per_token,
    llm_prefill_cost,
    param_counts,
    projector_cost,
    vision_tower_cost,
)

QWEN2 = dict(model_type="qwen2", hidden_size=56, intermediate_size=296, num_hidden_layers=2, num_attention_heads=7,
             num_key_value_heads=1, vocab_size=600)  # Qwen2-7B's 7 query heads per KV head
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=500, head_dim=12, attention_bias=True, mlp_bias=True,
             tie_word_embeddings=True)


def siglip(image_size=112, layers=3, width=24):
    return dict(model_type="siglip_vision_model", hidden_size=width, intermediate_size=90, num_hidden_layers=layers,
                num_attention_heads=2, image_size=image_size, patch_size=14, vision_use_head=False)


def build(vision=None, text=None, **fields):
    text = text or QWEN2
    cfg = StormConfig(vision_config=vision or siglip(), text_config=text, video_token_id=text["vocab_size"] - 1,
                      image_token_id=text["vocab_size"] - 2, **fields)
    model = StormForConditionalGeneration(cfg).eval()
    counts = param_counts(cfg)
    for part, module in (("vision_tower", model.vision_tower), ("projector", model.projector),
                         ("llm", model.language_model)):
        assert counts[part] == sum(p.numel() for p in module.parameters()), part
    return cfg, model


@pytest.fixture(autouse=True)
def visible_products(monkeypatch):
    """Products FlopCounterMode sees: BLAS linears, transformers' SDPA (not the C attention)."""
    monkeypatch.setenv("STORM_VLM_MATMUL", "blas")
    monkeypatch.setenv("STORM_VLM_ATTENTION_KERNEL", "0")


def matmul_flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class ArithmeticCount(TorchDispatchMode):
    """FLOPs of elementwise arithmetic and reductions, one per output element (two for addcmul; a
    sum or mean: one per input element, none where it reduces nothing, as a pool of 1 frame), of the
    ops `counts(args, out)` accepts."""

    def __init__(self, counts=lambda args, out: True):
        super().__init__()
        self.counts, self.flops = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name in ("sum", "mean"):
            if args[0].numel() > out.numel() and self.counts(args, out):
                self.flops += args[0].numel()
        elif name in ("mul", "add", "sub", "addcmul") and self.counts(args, out):
            self.flops += out.numel() * (2 if name == "addcmul" else 1)
        return out


@pytest.mark.parametrize("image_size,layers,feature_layer,frames", [
    (112, 3, -2, 7),  # 8 x 8 patches, the layer before last, 3 calls of 2-3 frames
    (384, 2, -1, 2),  # a 384 px SigLIP: 27 x 27 patches
    (112, 3, 1, 1),  # an image
])
def test_vision_tower(image_size, layers, feature_layer, frames):
    cfg, model = build(siglip(image_size, layers), vision_feature_layer=feature_layer, vision_batch_size=3)
    pixels = torch.randn(frames, 3, image_size, image_size)
    assert matmul_flops(lambda: model._vision_features(pixels)) == vision_tower_cost(cfg, frames).flops


@pytest.mark.parametrize("image_size,frames,fields", [
    (112, 8, dict(temporal_pool_size=4, spatial_pool_stride=2, temporal_sample_stride=2)),
    (384, 4, dict(projector_bidirectional=False, temporal_pool_size=2)),  # 27 x 27 -> 14 x 14 tokens
    (112, 3, dict(projector_type="mlp", spatial_pool_stride=2)),
])
def test_projector_scan_conv_and_pooling(monkeypatch, image_size, frames, fields):
    """The products as counted by torch; the scan's arithmetic on the state axis (the cost model's
    scan term), the conv's taps and the pooling means as `selective_scan_reference`,
    `_depthwise_conv` and `VisualTokenLayout.apply` compute them."""
    cfg, model = build(siglip(image_size, 1), **fields)
    state = cfg.projector_d_state
    scan_ops = ArithmeticCount(lambda args, out: out.shape[-1] == state or args[0].shape[-1] == state)
    conv_ops = ArithmeticCount()

    def scan(u, delta, *args, delta_proj=None, chunk=None, **kwargs):
        if delta_proj is not None:  # dt_proj: a product FlopCounterMode sees
            delta = project_delta(delta, delta_proj)
        with scan_ops:
            return scan_module.selective_scan_reference(u, delta, *args, **kwargs)

    def conv_silu(x, weight, bias, reverse, prefix=None):
        with conv_ops:
            return F.silu(mixer._depthwise_conv(x, weight, bias, reverse, prefix))

    monkeypatch.setattr(scan_module, "selective_scan", scan)
    monkeypatch.setattr(mixer, "_conv_silu", conv_silu)
    monkeypatch.setattr(fast_paths, "_one_call_library", lambda *args: None)  # the three steps one by one
    assert state not in (cfg.projector_expand * cfg.text_config.hidden_size, frames * cfg.projector_tokens_per_frame)
    features = torch.randn(1, frames, cfg.patch_grid_side**2, cfg.vision_config.hidden_size)
    pool_ops = ArithmeticCount()

    def run():
        out = model.projector(features)
        with pool_ops:
            cfg.visual_token_layout.apply(out)

    products = matmul_flops(run)
    assert products + scan_ops.flops + conv_ops.flops + pool_ops.flops == projector_cost(cfg, frames).flops
    if cfg.projector_type == "mamba":
        assert scan_ops.flops > 0 and conv_ops.flops > 0


@pytest.mark.parametrize("text", [QWEN2, LLAMA], ids=["qwen2-gqa", "llama-bias-tied"])
def test_llm_prefill_and_decode(text):
    """Prefill: torch counts SDPA's whole L x L square, the cost model's dense count; `causal=True`
    leaves out the 2·L·(L-1)·h·hd FLOPs above the diagonal. Decode steps at several cache lengths."""
    cfg, model = build(text=text)
    enable_fast_paths(model, decode=False)  # the model's own forward, whose products torch sees
    heads = text["num_attention_heads"] * text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    for length in (1, 37):
        embeds = torch.randn(1, length, text["hidden_size"])
        counted = matmul_flops(lambda: model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1))
        assert counted == llm_prefill_cost(cfg, length).flops
        upper = text["num_hidden_layers"] * 2 * length * (length - 1) * heads
        assert counted - upper == llm_prefill_cost(cfg, length, causal=True).flops
    with torch.no_grad():
        cache = model(inputs_embeds=torch.randn(1, 5, text["hidden_size"]), use_cache=True).cache
    token = torch.tensor([[3]])
    for _ in range(3):
        step = decode_cost(cfg, cache.get_seq_length())
        assert matmul_flops(lambda: model(input_ids=token, cache=cache, use_cache=True)) == step.flops
        with torch.no_grad():  # grow the cache: 5, 69, 133 tokens
            model(inputs_embeds=torch.randn(1, 64, text["hidden_size"]), cache=cache, use_cache=True)


class BytesRead(TorchDispatchMode):
    """Per storage among `storages`, the most bytes one op reads of it (view ops read nothing; an
    embedding lookup reads its rows)."""

    def __init__(self, storages):
        super().__init__()
        self.storages, self.read = storages, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            leaves = tree_leaves((args, kwargs or {}))
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages:
                    rows = leaves[1].numel() if func.overloadpacket.__name__ == "embedding" and i == 0 else None
                    n = t.numel() if rows is None else rows * t.shape[-1]
                    key = t.untyped_storage().data_ptr()
                    self.read[key] = max(self.read[key], n * t.element_size())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_are_what_a_step_reads(tied):
    """Weights: every LLM weight, the embedding table one row unless the LM head is tied to it;
    KV: the c cached tokens and the new one, as `kv_bytes_per_token` counts StormKVCache's tensors."""
    cfg, model = build(text={**QWEN2, "tie_word_embeddings": tied})
    enable_fast_paths(model, decode=False)
    context = 20
    with torch.no_grad():
        cache = model(inputs_embeds=torch.randn(1, context, QWEN2["hidden_size"]), use_cache=True).cache
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    assert sum(t.numel() * t.element_size() for kv in layers for t in kv) == kv_bytes_per_token(cfg, 4) * context
    weights = {p.untyped_storage().data_ptr() for p in model.language_model.parameters()}
    kv = {t.untyped_storage().data_ptr() for pair in layers for t in pair}
    reads = BytesRead(weights | kv)
    with torch.no_grad(), reads:
        model(input_ids=torch.tensor([[3]]), cache=cache, use_cache=True)
    cost = decode_cost(cfg, context, bytes_per_el=4)
    assert sum(reads.read[s] for s in weights) == cost.weight_bytes
    assert sum(reads.read[s] for s in kv) == cost.activation_bytes


def test_kv_bytes_per_token_under_bf16_autocast():
    """The bfloat16 precision on CPU: the cache holds keys and values in bf16 (2 bytes each)."""
    cfg, model = build(text=LLAMA)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        cache = model(inputs_embeds=torch.randn(1, 9, LLAMA["hidden_size"]), use_cache=True).cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv_bytes_per_token(cfg, 2) * 9


class ProductShapes(TorchDispatchMode):
    """Counter of (m, k, n) of every matrix product run."""

    def __init__(self):
        super().__init__()
        self.shapes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[-2:]
            self.shapes[(a.shape[0], a.shape[1], b.shape[1])] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(attention_library() is None, reason="no C compiler: SigLIP's q, k, v run apart")
def test_gemm_shapes_are_the_products_run(monkeypatch):
    """40 frames at vision_batch_size 32 run as two calls of 20 frames, q/k/v as one product (the
    SigLIP layers' separate passes: the fused layer of cpu_vit_layer runs its products in C)."""
    monkeypatch.delenv("STORM_VLM_ATTENTION_KERNEL")
    monkeypatch.setattr(fast_paths, "fused_layer_is_faster", lambda *a: False)
    cfg, model = build(siglip(layers=2), vision_feature_layer=-1, vision_batch_size=32)
    frames, text = 40, 6
    recorded = {}
    with torch.no_grad():
        for name, run in (("vision_tower", lambda: model._vision_features(torch.randn(frames, 3, 112, 112))),
                          ("llm_prefill", lambda: model(inputs_embeds=torch.randn(
                              1, cfg.num_visual_tokens(frames) + text, QWEN2["hidden_size"]), logits_to_keep=1))):
            with ProductShapes() as products:
                run()
            recorded[name] = products.shapes
    recorded["llm_prefill"][(1, QWEN2["hidden_size"], QWEN2["vocab_size"])] -= 1  # the last position's logits
    listed = gemm_shapes(cfg, frames, text_tokens=text)
    for name, shapes in recorded.items():
        assert +shapes == sum((Counter({(m, k, n): count}) for m, k, n, count in listed[name]), Counter()), name
