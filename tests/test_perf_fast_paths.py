"""The matmul backend choice (storm_vlm.model.matmul_backend) and the decode step (storm_vlm.model.decode)
change no result:
logits within float rounding, greedy tokens identical to the model's own forward."""

import copy
import time
import types

import pytest
import torch
from torch import nn

import storm_vlm.model.modeling as modeling
from storm_vlm import StormConfig
from storm_vlm.model import decode, matmul_backend
from storm_vlm.model.decode import DecodeStep
from storm_vlm.model.fast_paths import enable_fast_paths
from storm_vlm.model.kv_cache import StormKVCache
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.perf.profiler import build_random_model
from helpers import TINY_CONFIG as TINY
from helpers import KERNEL_ISAS, use_kernel_library

LLAMA = dict(TINY, text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                    attention_bias=True, mlp_bias=True))


@pytest.fixture(scope="module")
def model():
    return build_random_model(StormConfig(**TINY), seed=0)


@pytest.fixture
def plain_decode(monkeypatch):
    """Within the test, `plain()` turns the decode step off (the model's own forward runs)."""
    def plain():
        monkeypatch.setattr(modeling, "decode_step", lambda *a, **k: None)
    return plain


def test_decode_switch_of_enable_fast_paths(model):
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    call = dict(inputs_embeds=None, attention_mask=None, position_ids=None, cache=out.cache, use_cache=True, kwargs={})
    tok = out.logits[:, -1:].argmax(-1)
    enable_fast_paths(model, decode=False)
    try:
        with torch.inference_mode():
            assert decode.decode_step(model, tok, **call) is None
    finally:
        enable_fast_paths(model)
    with torch.inference_mode():
        assert decode.decode_step(model, tok, **call) is not None


def _generate(model, ids, **kw):
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids)) | kw
    with torch.inference_mode():
        return model.generate(ids, **kw)


def _left_padded(lengths, seed=2):
    """(input_ids, attention_mask) of rows of random tokens of these lengths, left-padded as a
    processor pads a batch for generation."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, ids.shape[1] - n:] = torch.randint(0, 60, (n,), generator=g)
        mask[row, ids.shape[1] - n:] = 1
    return ids, mask


def _three_steps(model, ids):
    """Prefill `ids`, then three decode steps, each fed the prefill's next token: (their logits, the cache)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        return [model(input_ids=tok, cache=cache, use_cache=True).logits for _ in range(3)], cache


# ---- matmul backend -------------------------------------------------------------------------------


def test_every_linear_measures_its_backend_and_keeps_its_parameters(model):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is matmul_backend._MeasuredLinear for m in linears)
    plain = StormConfig(**TINY)
    with torch.device("meta"):
        ref = modeling.StormForConditionalGeneration(plain)
    assert list(model.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("backend", ["blas", "onednn", "storm"])
def test_every_backend_gives_the_same_features_and_logits(model, monkeypatch, backend):
    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    if backend == "storm" and matmul_backend.cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    pixels = torch.randn(1, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 60, (1, 80), generator=torch.Generator().manual_seed(1))
    calls = []
    name = {"blas": "_onednn_linear", "onednn": "_onednn_linear", "storm": "storm_linear"}[backend]
    real = getattr(matmul_backend, name)
    monkeypatch.setattr(matmul_backend, name, lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        monkeypatch.setenv("STORM_VLM_MATMUL", backend)
        feats, _ = model.get_video_features(pixels)
        logits = model(input_ids=ids).logits
        monkeypatch.setenv("STORM_VLM_MATMUL", "blas")
        calls_before = len(calls)
        ref_feats, _ = model.get_video_features(pixels)
        ref_logits = model(input_ids=ids).logits
    assert (calls_before > 0) == (backend != "blas") and len(calls) == calls_before
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_measured_choice_is_cached_per_shape_and_autograd_takes_f_linear(monkeypatch):
    monkeypatch.delenv("STORM_VLM_MATMUL", raising=False)
    monkeypatch.setattr(matmul_backend, "_MATMUL_CHOICE", {})
    layer = nn.Linear(24, 40)
    matmul_backend.use_measured_linears(layer)
    x = torch.randn(300, 24)
    with torch.no_grad():
        out = layer(x)
    choices = matmul_backend.matmul_choices()
    assert list(choices) == [(24, 40, True, 256)] and choices[(24, 40, True, 256)] in ("blas", "onednn", "storm")
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    y = layer(x)  # training: F.linear and its gradient
    y.sum().backward()
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer.weight.grad is not None


def test_backend_is_measured_per_rows_bucket_on_the_real_rows(monkeypatch):
    """The faster library depends on the row count: each power-of-two bucket is timed on its own input
    (capped at _MEASURE_ROWS rows) and keeps its own answer."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    monkeypatch.delenv("STORM_VLM_MATMUL", raising=False)
    monkeypatch.setattr(matmul_backend, "_MATMUL_CHOICE", {})
    timed_rows = []

    def slow_when(backend_slow_below, fn):  # this backend sleeps below 256 rows, the other above
        def run(x, w, b):
            timed_rows.append(x.shape[0])
            if (x.shape[0] < 256) == backend_slow_below:
                time.sleep(0.002)
            return fn(x, w, b)
        return run

    onednn = slow_when(True, matmul_backend._onednn_linear)
    monkeypatch.setattr(matmul_backend, "_onednn_linear", onednn)
    storm = matmul_backend.storm_linear  # slower than both at every row count
    monkeypatch.setattr(matmul_backend, "storm_linear", lambda *a: time.sleep(0.004) or storm(*a))
    monkeypatch.setattr(matmul_backend, "F",
                        types.SimpleNamespace(linear=slow_when(False, torch.nn.functional.linear)))
    layer = nn.Linear(16, 8)
    matmul_backend.use_measured_linears(layer)
    with torch.no_grad():
        for rows in (100, 120, 300, 5000):
            layer(torch.randn(rows, 16))
    assert matmul_backend.matmul_choices() == {(16, 8, True, 64): "blas", (16, 8, True, 256): "onednn",
                                               (16, 8, True, matmul_backend._MEASURE_ROWS): "onednn"}
    # 100, 300 and the first _MEASURE_ROWS of 5000 rows were timed; 120 rows reused bucket 64's answer (one call)
    assert (min(timed_rows.count(r) for r in (100, 300, matmul_backend._MEASURE_ROWS)) > 5
            and timed_rows.count(120) == 1)


def test_c_kernel_is_taken_where_it_is_the_fastest(monkeypatch):
    if matmul_backend.cpu_kernel.load_library() is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv("STORM_VLM_MATMUL", raising=False)
    monkeypatch.setattr(matmul_backend, "_MATMUL_CHOICE", {})
    slow = lambda fn: lambda *a: time.sleep(0.002) or fn(*a)  # noqa: E731
    monkeypatch.setattr(matmul_backend, "_onednn_linear", slow(matmul_backend._onednn_linear))
    monkeypatch.setattr(matmul_backend, "F", types.SimpleNamespace(linear=slow(torch.nn.functional.linear)))
    calls = []
    storm = matmul_backend.storm_linear
    monkeypatch.setattr(matmul_backend, "storm_linear", lambda *a: calls.append(1) or storm(*a))
    layer = nn.Linear(16, 8)
    matmul_backend.use_measured_linears(layer)
    x = torch.randn(100, 16)
    with torch.no_grad():
        calls.clear()
        out = layer(x)
    assert matmul_backend.matmul_choices() == {(16, 8, True, 64): "storm"} and calls
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # the kernels switched off after the choice (STORM_VLM_SCAN_KERNEL=0, no compiler): F.linear
    monkeypatch.setattr(matmul_backend.cpu_kernel, "load_library", lambda *a, **k: None)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)) and not calls


# ---- decode step ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("layout", ["input-major", "own", "unfused"])
def test_greedy_generation_equals_the_models_forward(config, layout, monkeypatch, plain_decode):
    """The step as tensor operations (the C step off), in each layout, on a batch of two rows."""
    monkeypatch.setenv("STORM_VLM_DECODE_KERNEL", "0")
    if layout == "unfused":  # no room for copies: every projection reads the model's own matrices
        monkeypatch.setattr(decode, "_PACK_MEMORY_SHARE", 0.0)
    else:
        monkeypatch.setattr(decode, "_input_major_wins",
                            lambda mats: [w.t().contiguous() for w in mats] if layout == "input-major" else None)
    model = build_random_model(StormConfig(**config), seed=3)
    steps = []
    real = decode.DecodeStep.__call__
    monkeypatch.setattr(decode.DecodeStep, "__call__",
                        lambda self, *a, **k: steps.append((self.fused, *self.layouts.values())) or real(self, *a, **k))
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    fast = _generate(model, ids)
    expected = (False,) if layout == "unfused" else (True,) + (layout,) * 5
    assert steps and set(steps) == {expected}  # every decode step took the fast path, in that layout
    plain_decode()
    plain = _generate(model, ids)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("config", [TINY, LLAMA, {**TINY, "text_config": {**TINY["text_config"], "hidden_size": 40,
                                                                             "intermediate_size": 52}}],
                         ids=["qwen2", "llama", "qwen2-ragged-widths"])
def test_c_decode_step_generates_the_models_tokens_and_logits(config, kernel_steps, plain_decode):
    """One row: every step through the C step (all layers in one call); greedy tokens equal the model's
    own forward, logits within float rounding, KV cache the same."""
    model = build_random_model(StormConfig(**config), seed=3)
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(2))
    fast = _generate(model, ids, max_new_tokens=20, min_new_tokens=20)
    assert kernel_steps and all(kernel_steps)
    fast_logits, cache = _three_steps(model, ids)
    fast_keys = [layer.keys for layer in cache.layers]
    plain_decode()
    assert torch.equal(fast, _generate(model, ids, max_new_tokens=20, min_new_tokens=20))
    plain_logits, cache = _three_steps(model, ids)
    for a, b in zip(fast_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, layer in zip(fast_keys, cache.layers):
        torch.testing.assert_close(a, layer.keys, rtol=1e-5, atol=1e-5)


# head size 24: at 16 lanes one vector and a tail, at 8 three vectors, at 4 six; 3 query heads per KV head
WIDE_HEADS = {**TINY, "text_config": {**TINY["text_config"], "hidden_size": 72, "num_attention_heads": 3,
                                      "num_key_value_heads": 1, "intermediate_size": 40}}
# 9 query heads per KV head (the attention's head groups: 8 + 1 at 16 lanes, 4 + 4 + 1 at 8 and 4), two KV
# heads, head size 40 (at 16 lanes two vectors and a tail)
MANY_HEADS = {**TINY, "text_config": {**TINY["text_config"], "hidden_size": 720, "num_attention_heads": 18,
                                      "num_key_value_heads": 2, "intermediate_size": 40}}


@pytest.mark.parametrize("config", [WIDE_HEADS, MANY_HEADS], ids=["3-heads-of-24", "9x2-heads-of-40"])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_c_decode_step_on_each_isa_path(isa, config, monkeypatch, kernel_steps, plain_decode):
    """Every vector width of the C step (the narrower ones forced), over a cache longer than the
    values' block of 64 positions and not a multiple of the width, the rotary table refilled every 5
    positions: the model's tokens and logits."""
    lib = use_kernel_library(monkeypatch, isa)
    monkeypatch.setattr(decode, "_ROPE_BLOCK", 5)
    model = build_random_model(StormConfig(**config), seed=5)
    text = config["text_config"]
    assert model.language_model.model.layers[0].self_attn.head_dim == text["hidden_size"] // text["num_attention_heads"]
    ids = torch.randint(0, 60, (1, 61), generator=torch.Generator().manual_seed(3))
    fast = _generate(model, ids, max_new_tokens=12, min_new_tokens=12)
    fast_logits, _ = _three_steps(model, ids)
    assert kernel_steps and all(kernel_steps)
    assert decode.decode_step_path(model) == f"C step ({isa} x{lib.storm_lanes})"
    plain_decode()
    assert torch.equal(fast, _generate(model, ids, max_new_tokens=12, min_new_tokens=12))
    for a, b in zip(fast_logits, _three_steps(model, ids)[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _llm_linears(model) -> list[nn.Linear]:
    return [m for m in model.language_model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("config", [WIDE_HEADS, MANY_HEADS], ids=["3-heads-of-24", "9x2-heads-of-40"])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_c_decode_step_reads_bf16_projections_on_each_isa_path(isa, config, monkeypatch, kernel_steps):
    """The LLM's linear layers in bfloat16 (the bfloat16 precision as the loaders set it up): the C step
    widens them as it reads, so its tokens and logits are those of the same step on float32 weights
    holding the same values (up to the order of float32 sums); neither the tensor path nor the model's
    forward runs (on bf16 weights and float32 activations they would fail)."""
    use_kernel_library(monkeypatch, isa)
    fp32 = build_random_model(StormConfig(**config), seed=5)
    for m in _llm_linears(fp32):  # float32 weights that bfloat16 holds exactly
        m.to(torch.bfloat16).to(torch.float32)
    bf16 = copy.deepcopy(fp32)
    for m in _llm_linears(bf16):
        m.to(torch.bfloat16)
    ids = torch.randint(0, 60, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = fp32(input_ids=ids, use_cache=True)
        caches = {"fp32": out.cache, "bf16": copy.deepcopy(out.cache)}
        tokens = {name: out.logits[:, -1:].argmax(-1) for name in caches}
        logits = {name: [] for name in caches}
        for _ in range(12):
            for name, model in (("fp32", fp32), ("bf16", bf16)):
                step = model(input_ids=tokens[name], cache=caches[name], use_cache=True).logits
                logits[name].append(step)
                tokens[name] = step[:, -1:].argmax(-1)
    assert kernel_steps and all(kernel_steps) and len(kernel_steps) == 24
    for a, b in zip(logits["fp32"], logits["bf16"]):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not decode._DECODE_STEPS[bf16.language_model].tensor_path


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_c_decode_step_on_several_threads(threads, monkeypatch, kernel_steps, plain_decode):
    """The C step with its products' rows and the query heads split over threads (5: more than the 3
    heads, so 3; 3: more threads than this machine may have cores): the model's tokens and logits, for
    one row and for a left-padded batch."""
    monkeypatch.setenv("STORM_VLM_DECODE_KERNEL", "1")  # the C step, untimed
    model = build_random_model(StormConfig(**WIDE_HEADS), seed=5)
    ids = torch.randint(0, 60, (1, 70), generator=torch.Generator().manual_seed(3))
    batch, mask = _left_padded([70, 40, 55])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fast = _generate(model, ids, max_new_tokens=12, min_new_tokens=12)
        fast_batch = _generate(model, batch, attention_mask=mask)
        fast_logits, _ = _three_steps(model, ids)
    finally:
        torch.set_num_threads(before)
    assert kernel_steps and all(kernel_steps)
    plain_decode()
    assert torch.equal(fast, _generate(model, ids, max_new_tokens=12, min_new_tokens=12))
    assert torch.equal(fast_batch, _generate(model, batch, attention_mask=mask))
    for a, b in zip(fast_logits, _three_steps(model, ids)[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_c_decode_step_follows_every_other_writer_of_the_cache(kernel_steps):
    """The C step keeps its own copy of the keys in its layout; a crop, the tensor step and the model's
    forward rewrite positions of the cache between its steps, and it must attend over the new keys:
    each step's logits equal the model's forward over the whole sequence, without a cache."""
    model = build_random_model(StormConfig(**TINY), seed=3)
    seq = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(4))

    def step(cache, tokens):
        nonlocal seq
        seq = torch.cat([seq[:, :cache.get_seq_length()], torch.tensor([tokens])], 1)
        logits = model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, model(input_ids=seq).logits[:, -1], rtol=1e-4, atol=1e-4)

    with torch.inference_mode():
        cache = model(input_ids=seq, use_cache=True).cache
        for tok in (5, 6, 7):
            step(cache, [tok])  # positions 7, 8, 9 through the C step
        cache.crop(-2)  # back to 8 positions
        enable_fast_paths(model, decode_kernel=False)
        step(cache, [11])  # position 8 rewritten by the tensor step
        enable_fast_paths(model)
        step(cache, [12])  # the C step at 9 attends over the new key at 8
        cache.crop(-1)  # back to 9
        step(cache, [13, 14])  # positions 9, 10 rewritten by the model's forward (two tokens)
        step(cache, [15])
    assert kernel_steps == [True] * 3 + [False, True, True]


def test_c_decode_step_on_a_copy_of_the_cache(kernel_steps):
    """A deep copy of a cache mid-generation (as for beams or a branching chat) decodes into its own
    buffers: the original and the copy continue differently, each as the forward says."""
    model = build_random_model(StormConfig(**TINY), seed=3)
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(4))

    def last(tokens, cache=None):
        inputs = torch.tensor([tokens]) if cache is not None else torch.cat([ids, torch.tensor([tokens])], 1)
        return model(input_ids=inputs, cache=cache, use_cache=cache is not None).logits[:, -1]

    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).cache
        for tok in (5, 6):
            last([tok], cache)
        twin = copy.deepcopy(cache)
        got = [last([7], twin), last([8], cache), last([9], twin), last([10], cache)]
        expected = [last([5, 6, 7]), last([5, 6, 8]), last([5, 6, 7, 9]), last([5, 6, 8, 10])]
    assert kernel_steps == [True] * 6
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["C step slower", "tensor step slower", "C step pinned"])
def test_with_several_threads_the_faster_step_is_timed_once(case, monkeypatch, kernel_steps, plain_decode):
    """With several torch threads the C step (one core) and the threaded tensor step are timed on the
    first steps — the C step twice, the tensor step once — and the faster takes the rest;
    STORM_VLM_DECODE_KERNEL=1 skips the timing. The tokens are the model's either way."""
    def slowed(fn):
        def slow(*a, **k):
            time.sleep(0.05)
            return fn(*a, **k)
        return slow
    if case == "C step slower":
        monkeypatch.setattr(decode.DecodeStep, "_kernel_step", slowed(decode.DecodeStep._kernel_step))
    elif case == "tensor step slower":
        monkeypatch.setattr(decode, "_decode_layers", slowed(decode._decode_layers))
    else:
        monkeypatch.setenv("STORM_VLM_DECODE_KERNEL", "1")
    model = build_random_model(StormConfig(**TINY), seed=3)
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast = _generate(model, ids, max_new_tokens=8, min_new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    steps = 7  # the first new token comes from the prefill
    expected = {"C step slower": [True, True],  # then never called again
                "tensor step slower": [True] * (steps - 1),  # all but the third step
                "C step pinned": [True] * steps}[case]
    assert kernel_steps == expected
    step = decode._DECODE_STEPS[model.language_model]
    assert step._kernel_wins == ({} if case == "C step pinned" else {2: case == "tensor step slower"})
    torch.set_num_threads(2)
    try:
        assert decode.decode_step_path(model).startswith(
            "tensor operations (timed" if case == "C step slower" else "C step (")
    finally:
        torch.set_num_threads(threads)
    plain_decode()
    assert torch.equal(fast, _generate(model, ids, max_new_tokens=8, min_new_tokens=8))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("config", [TINY, LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("lengths", [[9, 4, 7], [9, 4, 7, 1, 9, 3, 6, 8, 2, 5]], ids=["3-rows", "10-rows"])
def test_c_decode_step_on_a_left_padded_batch(isa, config, lengths, monkeypatch, kernel_steps, plain_decode):
    """A batched generation (left padding, positions counted from each row's first token, as generate
    gives them) runs every step through the C step, all rows in one call (10 rows: more than one pass
    of rows over the weights on every ISA path): greedy tokens equal the model's own forward on the same
    batch, logits within float rounding; and each row's tokens equal that row generated alone."""
    use_kernel_library(monkeypatch, isa)
    model = build_random_model(StormConfig(**config), seed=3)
    ids, mask = _left_padded(lengths)
    kw = dict(attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    fast = _generate(model, ids, **kw)
    assert len(kernel_steps) == 11 and all(kernel_steps)
    alone = [_generate(model, ids[row:row + 1, ids.shape[1] - n:])[0, n:] for row, n in enumerate(lengths)]
    plain_decode()
    plain = _generate(model, ids, **kw)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(fast.sequences[row, ids.shape[1]:], tokens) for row, tokens in enumerate(alone))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("lengths", [[40], [40, 25, 33]], ids=["1-row", "3-rows-left-padded"])
def test_c_decode_step_under_bf16_autocast(isa, lengths, monkeypatch, kernel_steps):
    """The bfloat16 precision on CPU (fp32 weights under bf16 autocast) leaves part of the KV cache in
    bf16: the C step reads it as such and computes in float32, its scores on q and k rounded to bf16 as
    SDPA's bf16 attention takes them (the keys kept as bf16 pairs: AVX512-BF16 dot products, or widened).
    On each ISA path, against the model's fp32 forward on the same cache: logits within bf16 rounding
    of the one new value, that value stored as torch rounds it. Also on a left-padded batch."""
    use_kernel_library(monkeypatch, isa)
    model = build_random_model(StormConfig(**TINY), seed=3)
    for layer in model.language_model.model.layers:  # scores far from 0, so attention is not near uniform and
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):  # a wrong key or query shows in the logits
            proj.weight.data *= 8
    ids, mask = _left_padded(lengths)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    assert torch.bfloat16 in {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}
    ref_cache = copy.deepcopy(cache)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(input_ids=tok, attention_mask=mask, cache=cache, use_cache=True).logits
        assert kernel_steps == [True] and fast.dtype == torch.float32
        assert all(layer._keys_t.dtype == torch.int32 for layer in cache.layers)  # bf16 pairs
        for layer in ref_cache.layers:  # the same cached values, in float32
            layer.keys, layer.values = layer.keys.float(), layer.values.float()
        enable_fast_paths(model, decode=False)
        ref = model(input_ids=tok, attention_mask=mask, cache=ref_cache, use_cache=True).logits
    torch.testing.assert_close(fast, ref.float(), rtol=1e-3, atol=1e-3)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        assert layer.keys.shape[2] == ref_layer.keys.shape[2] == 41
        for t, r in ((layer.keys, ref_layer.keys), (layer.values, ref_layer.values)):
            torch.testing.assert_close(t[:, :, -1].float(), r[:, :, -1].to(t.dtype).float(), rtol=1e-2, atol=1e-2)
    enable_fast_paths(model, decode_kernel=False)  # the tensor path takes float32 caches only: it steps aside
    call = dict(inputs_embeds=None, attention_mask=None, position_ids=None, cache=cache, use_cache=True, kwargs={})
    with torch.inference_mode():
        assert decode.decode_step(model, tok, **call) is None


def test_c_decode_step_switch(kernel_steps):
    """enable_fast_paths(decode_kernel=False) runs one row as tensor operations, with the same tokens."""
    model = build_random_model(StormConfig(**TINY), seed=3)
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    with_kernel = _generate(model, ids)
    assert decode.decode_step_path(model).startswith("C step (") and all(kernel_steps)
    enable_fast_paths(model, decode_kernel=False)
    kernel_steps.clear()
    assert torch.equal(_generate(model, ids), with_kernel)
    assert decode.decode_step_path(model) == "tensor operations" and not any(kernel_steps)


def test_long_generation_across_buffer_growth_and_logits(model, plain_decode):
    # 150 tokens: past the cache's first capacity (prompt + 128), so the buffers grow once mid-way
    ids = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(4))
    fast = _generate(model, ids, max_new_tokens=150, min_new_tokens=150)
    fast_logits, cache = _three_steps(model, ids)
    assert cache.get_seq_length() == 8
    plain_decode()
    plain = _generate(model, ids, max_new_tokens=150, min_new_tokens=150)
    assert torch.equal(fast, plain)
    plain_logits, _ = _three_steps(model, ids)
    for a, b in zip(fast_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_step_is_rebuilt_when_weights_change(model, plain_decode):
    other = build_random_model(StormConfig(**TINY), seed=7)
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(5))
    before = _generate(model, ids)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(other.state_dict())
        after = _generate(model, ids)
        assert torch.equal(after, _generate(other, ids))
        assert decode._DECODE_STEPS[model.language_model].stale() is False
    finally:
        model.load_state_dict(saved)
    assert torch.equal(_generate(model, ids), before)


def test_it_steps_aside_where_it_does_not_apply(model):
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    call = dict(inputs_embeds=None, attention_mask=None, position_ids=None, cache=cache, use_cache=True, kwargs={})
    with torch.inference_mode():
        assert decode.decode_step(model, tok, **call) is not None
        cache.crop(-1)
        assert decode.decode_step(model, ids, **call) is None  # a prompt, not one token
        assert decode.decode_step(model, tok, **(call | {"attention_mask": torch.tensor([[1, 0] + [1] * 5])})) is None
        assert decode.decode_step(model, tok, **(call | {"kwargs": {"output_attentions": True}})) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the C step only (a batch of one row here)
            assert (decode.decode_step(model, tok, **call) is not None) == (cpu_kernel.load_library() is not None)
            cache.crop(-1)
            enable_fast_paths(model, decode_kernel=False)
            try:
                assert decode.decode_step(model, tok, **call) is None
            finally:
                enable_fast_paths(model)
    with torch.no_grad():
        model.train()
        try:
            assert decode.decode_step(model, tok, **call) is None
        finally:
            model.eval()
    assert decode.decode_step(model, tok, **call) is None  # autograd on
    assert decode.decode_step(model, tok, **(call | {"cache": StormKVCache()})) is None  # empty cache


def test_unsupported_llms_are_named():
    model = build_random_model(StormConfig(**TINY), seed=0)
    assert decode._decode_unsupported(model.language_model) is None
    model.language_model.config.model_type = "gemma"
    assert "gemma" in decode._decode_unsupported(model.language_model)


def test_rotation_matrix_is_transformers_rotary(model):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm = model.language_model
    step = DecodeStep(lm, pack=False)
    q = torch.randn(1, 4, 1, step.hd)
    k = torch.randn(1, 2, 1, step.hd)
    for pos in (0, 5, 1000):
        cos, sin = lm.model.rotary_emb(q, torch.tensor([[pos]]))
        q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
        rot = step._rotation(pos, torch.zeros(1, lm.config.hidden_size))
        torch.testing.assert_close(q.reshape(-1, step.hd) @ rot, q_ref.reshape(-1, step.hd), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k.reshape(-1, step.hd) @ rot, k_ref.reshape(-1, step.hd), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_generates_the_same_tokens(plain_decode):
    model = build_random_model(StormConfig(**TINY), seed=3)
    enable_fast_paths(model, compile_decode=True)
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(8))
    compiled = _generate(model, ids, max_new_tokens=20, min_new_tokens=20)
    plain_decode()
    assert torch.equal(compiled, _generate(model, ids, max_new_tokens=20, min_new_tokens=20))


def test_a_model_with_a_decode_step_is_freed():
    import gc
    import weakref

    model = build_random_model(StormConfig(**TINY), seed=1)
    ids = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(3))
    _generate(model, ids, max_new_tokens=2, min_new_tokens=2)
    assert model.language_model in decode._DECODE_STEPS
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
