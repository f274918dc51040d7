"""The CPU fast paths (C decode step, `storm_sdpa` prefill attention, one-pass RMSNorm and gate, the
matmul backend, `StormKVCache`) against transformers' own model as the reference: the same LLM
weights loaded into a plain `AutoModelForCausalLM` (SDPA attention, DynamicCache, none of this
project's code), over LLM configurations shaped like real releases (random weights, tiny widths).

float32: greedy tokens identical and logits within float rounding, prefill and many decode steps,
one row and a left-padded batch, beams and `num_return_sequences`, a chat's next segment, a context
that outgrows the KV cache's buffer, several threads. The bfloat16 precision (bf16 LLM linear
layers under autocast, as `storm_vlm.inference` loads a model): the C step's logits against the same
step computed as it is specified (float32 activations, q and k rounded to bf16 for the scores).
The whole grid, on every ISA build, runs with `-m slow`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from storm_vlm import StormConfig
from storm_vlm.inference import prepare_for_inference
from storm_vlm.perf.profiler import build_random_model
from storm_vlm.precision import resolve_precision
from helpers import KERNEL_ISAS, use_kernel_library

VOCAB = 97  # not a multiple of any vector width: the LM head's last rows are a tail
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)


def _qwen2(**kw):
    """Qwen2 / Qwen2.5 as released: q/k/v biases, rope_theta 1e6, the sliding-window keys present but off."""
    return dict(model_type="qwen2", vocab_size=VOCAB, num_hidden_layers=2, rope_theta=1e6, rms_norm_eps=1e-6,
                hidden_act="silu", use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                max_position_embeddings=32768, initializer_range=0.2) | kw


def _llama3(**kw):
    """Llama 3.1 / 3.2 as released: the "llama3" rope scaling, no biases, rope_theta 5e5."""
    return dict(model_type="llama", vocab_size=VOCAB, num_hidden_layers=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                hidden_act="silu", attention_bias=False, mlp_bias=False, max_position_embeddings=131072,
                initializer_range=0.2, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}) | kw


# Qwen2.5-7B-Instruct's long-context setting (its README's rope_scaling)
YARN = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
GRID = {
    # Qwen2-7B / Qwen2.5-7B: 28 query heads on 4 KV heads (7:1), untied, odd MLP width
    "qwen2.5-7b": _qwen2(hidden_size=112, num_attention_heads=7, num_key_value_heads=1, intermediate_size=150,
                         tie_word_embeddings=False),
    "qwen2.5-7b-yarn": _qwen2(hidden_size=112, num_attention_heads=7, num_key_value_heads=1, intermediate_size=150,
                              tie_word_embeddings=False, rope_scaling=YARN),
    # Qwen2.5-0.5B: 14 heads on 2 (7:1), tied embeddings
    "qwen2.5-0.5b-tied": _qwen2(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, intermediate_size=97,
                                tie_word_embeddings=True),
    "qwen2-gqa-2:1": _qwen2(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            tie_word_embeddings=False),
    "qwen2-mha-tied": _qwen2(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                             tie_word_embeddings=True),
    "qwen2-head-dim-24": _qwen2(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                intermediate_size=96),
    # Llama-3.1-8B: head_dim 128 (4:1 there), untied
    "llama3.1-8b-hd128": _llama3(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=200,
                                 tie_word_embeddings=False),
    # Llama-3.2-1B: head_dim 64, tied, rope factor 32
    "llama3.2-1b-hd64-tied": _llama3(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=201, tie_word_embeddings=True,
                                     rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "llama-biases": _llama3(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            attention_bias=True, mlp_bias=True),
    "llama-head-dim-32": _llama3(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 intermediate_size=96),
}
# the default run: each family's release shape once, the explicit head_dim and the biases
DEFAULT = ["qwen2.5-7b-yarn", "qwen2.5-0.5b-tied", "llama3.2-1b-hd64-tied", "qwen2-head-dim-24", "llama-biases"]
SLOW = [name for name in GRID if name not in DEFAULT]

# float32 logits (|logit| up to ~15 here): the fast paths and transformers both sit ~1e-5 from a
# float64 evaluation (~1e-4 for head_dim 128 over a long context); a wrong rotary position, head or
# cache entry moves them by O(1)
ATOL = 3e-4


def _build(text: dict, seed: int = 0):
    """(STORM with the fast paths, as built; transformers' plain LLM with the same weights)."""
    storm = build_random_model(StormConfig(vision_config=VISION, text_config=text, projector_num_layers=1,
                                           video_token_id=VOCAB - 1, image_token_id=VOCAB - 2), seed=seed)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(storm.config.text_config), attn_implementation="sdpa")
    ref.load_state_dict(storm.language_model.state_dict())
    assert type(ref.model.layers[0].mlp).__module__.startswith("transformers.")  # none of our classes
    return storm, ref.eval()


def _left_padded(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, ids.shape[1] - n:] = torch.randint(0, VOCAB - 2, (n,), generator=g)
        mask[row, ids.shape[1] - n:] = 1
    return ids, mask


def _generate(model, ids, mask, new, **kw):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, attention_mask=mask, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0) | kw
    with torch.inference_mode():
        return model.generate(ids, **kw)


def _teacher_forced(ref, sequences, prompt_mask):
    """ref's logits for each generated token of `sequences` (B, prompt + new), in one forward."""
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(sequences.shape[0], sequences.shape[1] - prompt_mask.shape[1])], 1)
    with torch.inference_mode():
        logits = ref(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, prompt_mask.shape[1] - 1:-1]


def _check_generation(name, lengths, new, kernel_steps, atol=ATOL, **kw):
    storm, ref = _build(GRID[name])
    ids, mask = _left_padded(lengths)
    fast = _generate(storm, ids, mask, new, **kw)
    assert kernel_steps and all(kernel_steps) and len(kernel_steps) == new - 1  # every decode step: the C step
    plain = _generate(ref, ids, mask, new, **kw)
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.logits, 1), torch.stack(plain.logits, 1), rtol=0, atol=atol)
    if not kw:  # greedy: every step's logits against one forward of transformers over the whole sequence
        torch.testing.assert_close(torch.stack(fast.logits, 1), _teacher_forced(ref, fast.sequences, mask),
                                   rtol=0, atol=atol)


@pytest.mark.parametrize("lengths", [[9], [9, 4, 1, 12]], ids=["1-row", "4-rows-left-padded"])
@pytest.mark.parametrize("name", DEFAULT)
def test_greedy_generation_is_transformers(name, lengths, kernel_steps):
    _check_generation(name, lengths, 16, kernel_steps)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [[9], [9, 4, 1, 12]], ids=["1-row", "4-rows-left-padded"])
@pytest.mark.parametrize("name", SLOW)
def test_greedy_generation_is_transformers_whole_grid(name, lengths, kernel_steps):
    _check_generation(name, lengths, 24, kernel_steps)


@pytest.mark.slow
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("name", list(GRID))
def test_greedy_generation_is_transformers_on_each_isa(name, isa, monkeypatch, kernel_steps):
    use_kernel_library(monkeypatch, isa)
    _check_generation(name, [9, 4, 1, 12], 12, kernel_steps)


@pytest.mark.parametrize("name", ["qwen2.5-7b-yarn", "llama3.2-1b-hd64-tied"])
def test_beams_and_return_sequences_are_transformers(name, kernel_steps):
    """generate prefills one copy per prompt and repeats its cache (`_prefill`): the beams' tokens
    and every step's logits are transformers' (which prefills every copy)."""
    _check_generation(name, [9, 4, 7], 8, kernel_steps, num_beams=3, num_return_sequences=2)


@pytest.mark.parametrize("name", ["qwen2-gqa-2:1", "llama3.2-1b-hd64-tied"])
def test_sampling_with_a_seed_is_transformers(name):
    """A seeded sampled generation draws the same tokens as transformers' model with that seed, on the
    model's first generation too: building the decode step (timed on the first step) must not draw
    from torch's global generator."""
    storm, ref = _build(GRID[name])
    ids, mask = _left_padded([9, 4, 7])
    kw = dict(do_sample=True, top_k=0, num_return_sequences=2, output_logits=False, return_dict_in_generate=False)
    torch.manual_seed(7)
    first = _generate(storm, ids, mask, 10, **kw)
    torch.manual_seed(7)
    plain = _generate(ref, ids, mask, 10, **kw)
    torch.manual_seed(7)
    again = _generate(storm, ids, mask, 10, **kw)
    assert torch.equal(first, plain) and torch.equal(again, plain)


@pytest.mark.parametrize("name", ["qwen2-gqa-2:1"])
def test_context_past_the_kv_buffer_is_transformers(name, kernel_steps):
    """Prompts of 130 and 5 tokens then 140 new: every layer's buffer (prompt + 128 spare) grows while
    the C step writes into it, its transposed keys start over; rotary positions pass the 256 of the
    step's table."""
    _check_generation(name, [5, 130], 140, kernel_steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-head-dim-32", "qwen2.5-7b"])
def test_long_context_past_the_kv_buffer_is_transformers(name, kernel_steps):
    """Past 2048 positions the buffer grows by 1/16 rather than 128."""
    _check_generation(name, [2100, 1500], 140, kernel_steps, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", ["qwen2.5-7b-yarn", "llama-head-dim-32"])
def test_chat_segments_continuing_a_cache_are_transformers(name, rows):
    """A chat's next turn: several tokens after a cache (the prefill attention's `continues_cache`
    case, in C), then decode steps, then another segment after them."""
    storm, ref = _build(GRID[name])
    g = torch.Generator().manual_seed(5)
    segments = [torch.randint(0, VOCAB - 2, (rows, n), generator=g) for n in (11, 7)]
    with torch.inference_mode():
        fast, plain = storm(input_ids=segments[0], use_cache=True), ref(input_ids=segments[0], use_cache=True)
        cache, ref_cache = fast.cache, plain.cache
        fast = storm(input_ids=segments[1], cache=cache, use_cache=True).logits
        plain = ref(input_ids=segments[1], cache=ref_cache, use_cache=True).logits
        torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
        tok = fast[:, -1:].argmax(-1)
        for _ in range(4):
            fast = storm(input_ids=tok, cache=cache, use_cache=True).logits
            plain = ref(input_ids=tok, cache=ref_cache, use_cache=True).logits
            torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)
            tok = fast[:, -1:].argmax(-1)
        more = torch.randint(0, VOCAB - 2, (rows, 5), generator=g)
        torch.testing.assert_close(storm(input_ids=more, cache=cache, use_cache=True).logits,
                                   ref(input_ids=more, cache=ref_cache, use_cache=True).logits,
                                   rtol=0, atol=ATOL)


@pytest.mark.parametrize("lengths", [[300], [300, 120, 7]], ids=["1-row", "3-rows-left-padded"])
def test_two_threads_are_transformers(lengths, kernel_steps):
    """With two torch threads: the prefill attention split over (batch, head) pairs (head_dim 128, 300
    keys: more work per pair than one thread takes), the C step's products and heads split, one row's
    step timed against the tensor step (either runs the rest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        storm, ref = _build(GRID["llama3.1-8b-hd128"])
        ids, mask = _left_padded(lengths)
        fast = _generate(storm, ids, mask, 12)
        plain = _generate(ref, ids, mask, 12)
    finally:
        torch.set_num_threads(threads)
    assert kernel_steps and kernel_steps[0]
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.logits, 1), torch.stack(plain.logits, 1), rtol=0, atol=ATOL)


# ---- the bfloat16 precision ------------------------------------------------------------------------


def _bf16_scores_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention in float32 with q and k rounded to bf16 first: the scores the C step
    computes under the bfloat16 precision (as SDPA's bf16 attention takes them under autocast)."""
    query, key = (t.to(torch.bfloat16).float() for t in (query, key))
    return sdpa_attention_forward(module, query, key, value.float(), attention_mask, **kwargs)


AttentionInterface.register("bf16_scores_sdpa", _bf16_scores_sdpa)
AttentionMaskInterface.register("bf16_scores_sdpa", sdpa_mask)  # (else no padding mask is built)


def _bf16_step_check(name, lengths, kernel_steps, steps=6):
    """The bfloat16 precision (prepare_for_inference: bf16 LLM linear layers, bf16 autocast): after its
    prefill, each C step's logits against transformers' model in float32 on the same weights (bf16
    values, exact in float32), attention scores on bf16-rounded q and k, over a float32 copy of the
    same cache. Both compute in float32 what the C step is specified to compute; what is left is float32
    rounding and the new token's key and value, which the cache stores in bf16."""
    storm, ref = _build(GRID[name])
    storm = prepare_for_inference(storm, "cpu", resolve_precision("bfloat16", torch.device("cpu")))
    assert storm.language_model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    ref.load_state_dict({k: v.float() for k, v in storm.language_model.state_dict().items()})
    ref.set_attn_implementation("bf16_scores_sdpa")
    ids, mask = _left_padded(lengths)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    with torch.inference_mode():
        out = storm(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        assert torch.bfloat16 in {layer.values.dtype for layer in cache.layers}
        for _ in range(steps):
            mask, positions = torch.cat([mask, mask[:, -1:]], 1), positions + 1
            ref_cache = DynamicCache(config=ref.config)
            for i, layer in enumerate(cache.layers):
                ref_cache.update(layer.keys.float(), layer.values.float(), i)
            want = ref(input_ids=tok, attention_mask=mask, position_ids=positions, cache=ref_cache).logits
            got = storm(input_ids=tok, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=6e-2)  # ~ one bf16 step of |logit| 8-16
            tok = got[:, -1:].argmax(-1)
    assert kernel_steps and all(kernel_steps) and len(kernel_steps) == steps


@pytest.mark.parametrize("lengths", [[9], [30, 4, 17]], ids=["1-row", "3-rows-left-padded"])
@pytest.mark.parametrize("name", ["qwen2.5-7b-yarn", "llama3.2-1b-hd64-tied"])
def test_bf16_precision_decode_step_is_its_specification(name, lengths, kernel_steps):
    _bf16_step_check(name, lengths, kernel_steps)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [[9], [30, 4, 17]], ids=["1-row", "3-rows-left-padded"])
@pytest.mark.parametrize("name", [n for n in GRID if n not in ("qwen2.5-7b-yarn", "llama3.2-1b-hd64-tied")])
def test_bf16_precision_decode_step_is_its_specification_whole_grid(name, lengths, kernel_steps):
    _bf16_step_check(name, lengths, kernel_steps)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-tied", "llama3.1-8b-hd128"])
def test_bf16_precision_prefill_is_transformers_under_autocast(name):
    """The bfloat16 precision's prefill (storm_sdpa in bf16, one-pass norms and gate) against
    transformers' model under the same autocast: the first token's logits within bf16 rounding
    (4 bf16 steps at |logit| 8-16; 2.5 seen; a wrong head or position is O(1))."""
    storm, ref = _build(GRID[name])
    storm = prepare_for_inference(storm, "cpu", resolve_precision("bfloat16", torch.device("cpu")))
    ids, mask = _left_padded([12, 5, 9])
    for m in (ids[:1], mask[:1]), (ids, mask):
        with torch.inference_mode():
            got = storm(input_ids=m[0], attention_mask=m[1]).logits[:, -1]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want = ref(input_ids=m[0], attention_mask=m[1],
                           position_ids=(m[1].cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.25)
