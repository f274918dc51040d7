"""Per-module latency of a STORM model: vision tower, projector (+ compression), LLM prefill, decode.

One row per (frames, compression). Each row runs the model's own public path on random pixels:

1. `model.get_video_features(pixels (1, T, 3, H, W), temporal_sample_stride=s)` — a forward
   pre-hook on `model.projector` splits it into **vision tower** (everything before the projector
   starts: the chunked SigLIP calls) and **projector** (pixel shuffle + Mamba/MLP + temporal/spatial
   pooling + temporal sampling, up to the return);
2. **LLM prefill**: `model(inputs_embeds=[text | visual tokens | text], use_cache=True,
   logits_to_keep=1)`;
3. **decode**: greedy one-token steps `model(input_ids=(1, 1), cache=...)` on the prefill's KV cache
   (the cache is cropped back to the prefill length between repeats).

Steps 1-2 run `warmup` + `repeats` times and the medians are kept; decode runs `warmup` + `repeats`
rounds of `decode_tokens` steps and keeps the median step. Timing uses CUDA events on GPU and
`time.perf_counter` (or, with `clock="cpu"`, the process's CPU time) on CPU. `total_ms` = vision +
projector + prefill + decode_tokens x decode step: the latency of answering with `decode_tokens`
tokens.

Compression c (see `storm_vlm.perf.costmodel.DEFAULT_COMPRESSIONS`): 1 = none, 4 = temporal pool 4,
8 = temporal pool 4 + temporal sample 2; custom settings as "16=4:2:2" (pool:sample:spatial). The
pooling sizes are switched on the model's config for the row and restored afterwards: this changes
what a model trained with other pooling computes (not its cost), so rows measure latency only.

Each row also carries `gflop` (per module, from `storm_vlm.perf.costmodel`; the LLM's attention counted
causal, the lower triangle its kernels compute, as benchmarks/prefill.py counts it)
and `gflop_per_s` (the rate each module reached), and `page_faults` (minor faults during the row).

Peak memory: CUDA `max_memory_allocated` (reset per row); on CPU the process's resident-set
high-water mark, reset per row through /proc/self/clear_refs (Linux), so each row's peak is its
own (it includes the weights and everything else resident; `memory_baseline_mb` is the RSS when
the row started). Where the reset is unavailable the process-lifetime peak is reported and the
metadata says so. Rows whose estimated activations (from `storm_vlm.perf.costmodel`) exceed the free
memory, or that run out of memory, are skipped with a note instead of crashing.

Tables and plots: `storm_vlm.perf.report`; the host description and /proc readings:
`storm_vlm.perf.host`.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from storm_vlm.errors import ConfigError, StormError
from storm_vlm.inference import load_model, prepare_for_inference
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.modeling import StormForConditionalGeneration
from storm_vlm.perf.allocator import allocator_state
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, Compression, pipeline_cost
from storm_vlm.perf.host import (
    describe_host,
    load_average,
    page_faults,
    peak_rss_mb,
    proc_status_kb,
    reset_peak_rss,
)
from storm_vlm.precision import Precision, resolve_precision
from storm_vlm.utils import available_memory_bytes, check_int, yaml_problem

__all__ = [
    "ROW_FIELDS",
    "ProfileSettings",
    "load_model_config",
    "build_random_model",
    "load_saved_model",
    "prepare_model",
    "profile_model",
    "profile_row",
    "prefill_video",
    "decode_latency",
    "Clock",
    "PeakMemory",
]

ROW_FIELDS = (
    "frames",
    "compression",
    "visual_tokens",
    "vision_tower_ms",
    "projector_ms",
    "llm_prefill_ms",
    "decode_ms_per_token",
    "total_ms",
    "peak_memory_mb",
)

PROFILE_KEYS = ("text_tokens", "decode_tokens", "frames", "compression", "repeats", "warmup")


@dataclass
class ProfileSettings:
    """What to measure. `compressions` are `costmodel.Compression`s; `precision` a name of
    `storm_vlm.precision.PRECISIONS` (resolved on `device`); `clock` "wall" or "cpu" (CPU only:
    the process's CPU time, which leaves out time spent waiting for a core on a shared machine)."""

    frames: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128, 256])
    compressions: list[Compression] = field(default_factory=lambda: list(DEFAULT_COMPRESSIONS.values()))
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 16
    text_tokens: int = 64
    precision: str = "float32"
    device: str = "cpu"
    seed: int = 0
    max_memory_gb: float | None = None
    clock: str = "wall"

    @property
    def resolved(self) -> Precision:
        return resolve_precision(self.precision, self.device)

    def validate(self) -> None:
        if not self.frames:
            raise StormError("--frames: give at least one frame count")
        for f in self.frames:
            check_int("--frames", f, error=StormError)
        for name, minimum in (("repeats", 1), ("warmup", 0), ("decode_tokens", 0), ("text_tokens", 0)):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum, error=StormError)
        resolve_precision(self.precision, self.device)  # StormError for a bad name or float16 on CPU
        if self.clock not in ("wall", "cpu"):
            raise StormError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.device not in ("cpu", "cuda"):
            raise StormError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise StormError("--device cuda: no CUDA device is available (use --device cpu)")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["compressions"] = [asdict(c) | {"label": c.label} for c in self.compressions]
        out["compute_dtype"] = self.resolved.describe()
        return out


# ---- the model ------------------------------------------------------------------------------------


def load_model_config(path) -> tuple[StormConfig, dict]:
    """Read a profile YAML (`model:` = StormConfig fields, optional `profile:` defaults).

    Returns (StormConfig, profile_defaults dict). Raises ConfigError naming the file on any problem.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{path}: needs a `model:` mapping of StormConfig fields")
    defaults = raw.get("profile") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: `profile:` must be a mapping")
    unknown = set(defaults) - set(PROFILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown `profile:` keys {sorted(unknown)}")
    try:
        config = StormConfig(**raw["model"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid model config ({exc})") from None
    return config, defaults


def build_random_model(config: StormConfig, seed: int = 0) -> StormForConditionalGeneration:
    """A randomly initialised `StormForConditionalGeneration` for `config`, in eval mode."""
    torch.manual_seed(seed)
    return StormForConditionalGeneration(config).eval()


def prepare_model(model, settings: ProfileSettings):
    """`model` set up for the settings' device and precision as the loader sets up a loaded one
    (`storm_vlm.inference.prepare_for_inference`), so a random-weight model runs as a loaded one does."""
    return prepare_for_inference(model, settings.device, settings.resolved)


def load_saved_model(model_dir, settings: ProfileSettings):
    """A saved STORM model for profiling, through the project's one loader (`storm_vlm.inference`)."""
    model, _processor = load_model(model_dir, device=settings.device, precision=settings.precision)
    return model


# ---- timing and memory -----------------------------------------------------------------------------


class Clock:
    """Marks points in time: CUDA events on GPU (read after one synchronize), perf_counter on CPU.

    kind "cpu" (CPU only): the CPU time of this process (`time.process_time`) instead of wall time.
    With one torch thread on an idle machine the two agree; on a shared machine CPU time leaves
    out the time the process waited for a core (memory and cache contention still count). With
    several threads it sums their time, so it is not a latency then.
    """

    def __init__(self, device: str, kind: str = "wall"):
        self.cuda = device == "cuda"
        self._now = time.process_time if kind == "cpu" and not self.cuda else time.perf_counter

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._now()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class PeakMemory:
    """Per-row peak memory: CUDA allocator peak, or the CPU RSS high-water mark.

    `trim` (CPU): give the freed heap back to the kernel before each row, so the row's peak RSS is
    its own; without it the next run reuses the warm heap (no fresh pages) and the peak includes
    whatever earlier rows left resident.
    """

    def __init__(self, device: str, trim: bool = True):
        self.device = device
        self.trim = trim
        if device == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif reset_peak_rss():
            self.kind = "rss_high_water_mark_per_row"
        else:
            self.kind = "process_peak_rss"

    def reset(self) -> float:
        """Start a row; returns the memory in use now (MiB)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        if self.trim:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS is this row's
        if self.kind == "rss_high_water_mark_per_row":
            reset_peak_rss()
        return (proc_status_kb("VmRSS") or 0) / 1024

    def peak(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mb()

    def free_bytes(self) -> float:
        if self.device == "cuda":
            return float(torch.cuda.mem_get_info()[0])
        return available_memory_bytes()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---- one row ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _compression_on(model, compression: Compression):
    cfg = model.config
    saved = (cfg.temporal_pool_size, cfg.spatial_pool_stride)
    cfg.temporal_pool_size, cfg.spatial_pool_stride = compression.temporal_pool, compression.spatial_pool
    try:
        cfg.validate_storm_fields()
        yield
    finally:
        cfg.temporal_pool_size, cfg.spatial_pool_stride = saved


class _ProjectorStart:
    """Forward pre-hook on `model.projector`: marks when the projector starts (vision tower done)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.mark = None
        self.handle = model.projector.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.mark = self.clock.mark()

    def remove(self):
        self.handle.remove()


def _text_ids(model, n: int, generator: torch.Generator) -> torch.Tensor:
    vocab = model.config.text_config.vocab_size
    reserved = {model.config.video_token_id, model.config.image_token_id} - {None}
    ids = torch.randint(0, vocab, (1, n), generator=generator)
    for r in reserved:  # never a placeholder id
        ids[ids == r] = (r + 1) % vocab if (r + 1) % vocab not in reserved else (r + 2) % vocab
    return ids


def _inputs(model, frames: int, settings: ProfileSettings):
    """Random pixels (1, T, 3, H, W) and prompt ids (1, text_tokens), seeded."""
    gen = torch.Generator().manual_seed(settings.seed)
    vc = model.config.vision_config
    pixels = torch.randn(1, frames, vc.num_channels, vc.image_size, vc.image_size, generator=gen)
    text = _text_ids(model, settings.text_tokens, gen)
    return pixels.to(settings.device), text.to(settings.device)


def _prefill(model, pixels, text, compression: Compression, visual: int, clock: Clock):
    """Video features + LLM prefill on [text[:half] | visual tokens | text[half:]].

    Returns (model output with `.cache` and `.logits` (1, 1, V), marks (t0, t_features, t_llm0, t_llm1)).
    """
    clock.sync()
    t0 = clock.mark()
    feats, _ = model.get_video_features(pixels, temporal_sample_stride=compression.temporal_sample)
    t1 = clock.mark()
    if feats.shape[0] * feats.shape[1] * feats.shape[2] != visual:
        raise RuntimeError(
            f"profiler: the model produced {tuple(feats.shape[:3])} visual tokens, "
            f"StormConfig.num_visual_tokens says {visual}"
        )
    t2 = clock.mark()
    text_emb = model.get_input_embeddings()(text)
    half = text.shape[1] // 2
    tokens = feats.reshape(1, visual, feats.shape[-1]).to(text_emb.dtype)
    inputs = torch.cat([text_emb[:, :half], tokens, text_emb[:, half:]], dim=1)
    out = model(inputs_embeds=inputs, use_cache=True, logits_to_keep=1)
    t3 = clock.mark()
    return out, (t0, t1, t2, t3)


def decode_steps(model, cache, token, steps: int, clock: Clock,
                 attention_mask: torch.Tensor | None = None) -> tuple[list[float], list[list[int]]]:
    """`steps` greedy one-token steps on `cache` (grown in place), then cropped back. token (B, 1);
    `attention_mask` (B, cached tokens): a left-padded batch's, extended by a column per step, with
    each row's positions counted from its first token (as generate passes them).

    Returns (ms per step, the greedy token ids of every row at each step)."""
    start = cache.get_seq_length()
    times, tokens = [], []
    extra = {}
    with torch.inference_mode():
        for _ in range(steps):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(token.shape[0], 1)], 1)
                extra = dict(attention_mask=attention_mask, position_ids=attention_mask.sum(1, keepdim=True) - 1)
            clock.sync()
            s0 = clock.mark()
            out = model(input_ids=token, cache=cache, use_cache=True, **extra)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            s1 = clock.mark()
            times.append(clock.ms(s0, s1))
            tokens.append(token[:, 0].tolist())
    extra = cache.get_seq_length() - start
    if extra:
        cache.crop(-extra)
    return times, tokens


def prefill_video(model, frames: int, compression: Compression, settings: ProfileSettings):
    """Run one (untimed) prefill of a random `frames`-frame video; returns (kv cache, next token (1, 1)).

    For benchmarks that time decoding on several caches in turn: pass the results to `decode_latency`.
    The model must already be on `settings.device` in the right dtype (see `profile_model`).
    """
    with _compression_on(model, compression), torch.inference_mode(), settings.resolved.context():
        visual = model.config.num_visual_tokens(frames, temporal_sample_stride=compression.temporal_sample)
        pixels, text = _inputs(model, frames, settings)
        out, _ = _prefill(model, pixels, text, compression, visual, Clock(settings.device, settings.clock))
        return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_latency(model, cache, token, steps: int, settings: ProfileSettings) -> list[float]:
    """Milliseconds of each of `steps` greedy decode steps on `cache`; the cache is cropped back after."""
    with torch.inference_mode(), settings.resolved.context():
        return decode_steps(model, cache, token, steps, Clock(settings.device, settings.clock))[0]


def _measure(model, frames, compression, visual, settings, clock, memory) -> dict:
    pixels, text = _inputs(model, frames, settings)
    baseline = memory.reset()
    faults0 = page_faults()
    hook = _ProjectorStart(model, clock)
    vision_ms, projector_ms, prefill_ms = [], [], []
    cache = None
    try:
        with torch.inference_mode(), settings.resolved.context():
            for i in range(settings.warmup + settings.repeats):
                cache = out = None  # free the previous KV cache before the next prefill
                out, (t0, t1, t2, t3) = _prefill(model, pixels, text, compression, visual, clock)
                if i >= settings.warmup:
                    vision_ms.append(clock.ms(t0, hook.mark))
                    projector_ms.append(clock.ms(hook.mark, t1))
                    prefill_ms.append(clock.ms(t2, t3))
                cache = out.cache
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
            prefill_len = cache.get_seq_length()
            steps = []
            if settings.decode_tokens:
                for r in range(settings.warmup + settings.repeats):
                    times, _ = decode_steps(model, cache, next_token, settings.decode_tokens, clock)
                    if r >= settings.warmup:
                        steps.extend(times)
    finally:
        hook.remove()
    peak = memory.peak()
    faults = page_faults() - faults0
    del cache
    med = statistics.median
    vision, projector, prefill = med(vision_ms), med(projector_ms), med(prefill_ms)
    decode = med(steps) if steps else 0.0
    total = vision + projector + prefill + settings.decode_tokens * decode
    return {
        "vision_tower_ms": round(vision, 3),
        "projector_ms": round(projector, 3),
        "llm_prefill_ms": round(prefill, 3),
        "decode_ms_per_token": round(decode, 3),
        "total_ms": round(total, 3),
        "peak_memory_mb": round(peak, 1),
        "memory_baseline_mb": round(baseline, 1),
        "kv_cache_tokens": prefill_len,
        "page_faults": faults,
        "samples_ms": {
            "vision_tower": [round(x, 3) for x in vision_ms],
            "projector": [round(x, 3) for x in projector_ms],
            "llm_prefill": [round(x, 3) for x in prefill_ms],
            "decode_steps": len(steps),
        },
    }


def _achieved(row: dict, est) -> dict:
    """Each module's FLOPs (storm_vlm.perf.costmodel, LLM attention counted causal) and the rate reached."""
    parts = {
        "vision_tower": (est.vision_tower.flops, row["vision_tower_ms"]),
        "projector": (est.projector.flops, row["projector_ms"]),
        "llm_prefill": (est.llm_prefill.flops, row["llm_prefill_ms"]),
        "decode_per_token": (est.decode_per_token.flops, row["decode_ms_per_token"]),
    }
    return {
        "gflop": {k: float(f"{f / 1e9:.5g}") for k, (f, _) in parts.items()},
        "gflop_per_s": {k: float(f"{f / ms / 1e6:.4g}") if ms else None for k, (f, ms) in parts.items()},
    }


def _skipped(row: dict, note: str) -> dict:
    for key in ROW_FIELDS:
        row.setdefault(key, None)
    row["skipped"] = True
    row["note"] = note
    return row


def profile_row(model, frames: int, compression: Compression, settings: ProfileSettings, *,
                clock: Clock | None = None, memory: PeakMemory | None = None) -> dict:
    """Measure one (frames, compression) row; returns a dict with ROW_FIELDS (+ details, or `skipped`)."""
    clock = clock or Clock(settings.device, settings.clock)
    memory = memory or PeakMemory(settings.device)
    cfg = model.config
    with _compression_on(model, compression):
        visual = cfg.num_visual_tokens(frames, temporal_sample_stride=compression.temporal_sample)
        row = {
            "frames": frames,
            "compression": compression.factor,
            "compression_label": compression.label,
            "temporal_pool": compression.temporal_pool,
            "temporal_sample": compression.temporal_sample,
            "spatial_pool": compression.spatial_pool,
            "visual_tokens": visual,
            "text_tokens": settings.text_tokens,
        }
        # Skip what would not fit: activations + KV (weights are already resident).
        bytes_per_el = settings.resolved.weights.itemsize
        est = pipeline_cost(cfg, frames, compression, settings.text_tokens, settings.decode_tokens, bytes_per_el,
                            causal=True)
        need = max(est.vision_tower.activation_bytes, est.projector.activation_bytes,
                   est.llm_prefill.activation_bytes + est.decode_per_token.activation_bytes)
        limit = memory.free_bytes() * 0.9
        if settings.max_memory_gb is not None:
            limit = min(limit, settings.max_memory_gb * 2**30)
        row["estimated_activation_mb"] = round(need / 2**20, 1)
        if need > limit:
            return _skipped(row, f"skipped: estimated {need / 2**30:.2f} GiB of activations exceeds the "
                                 f"{limit / 2**30:.2f} GiB available")
        try:
            row.update(_measure(model, frames, compression, visual, settings, clock, memory))
            row.update(_achieved(row, est))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is turned into a skipped row
            if not _is_oom(exc):
                raise
            if settings.device == "cuda":
                torch.cuda.empty_cache()
            return _skipped(row, f"skipped: out of memory ({str(exc).splitlines()[0][:200]})")
    return row


# ---- the whole profile ------------------------------------------------------------------------------


def _model_info(model) -> dict:
    cfg = model.config
    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision_tower", "projector", "language_model")
    }
    return {
        "projector_type": cfg.projector_type,
        "parameters": parts,
        "vision": {k: getattr(cfg.vision_config, k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "llm": {
            "model_type": cfg.text_config.model_type,
            **{k: getattr(cfg.text_config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        },
        "tokens_per_frame": cfg.tokens_per_frame,
        "trained_temporal_pool_size": cfg.temporal_pool_size,
        "trained_spatial_pool_stride": cfg.spatial_pool_stride,
    }


def profile_model(model, settings: ProfileSettings, source: str = "", progress: bool = True) -> dict:
    """Profile every frames x compression row; returns {"settings", "host", "model", "rows", ...}."""
    settings.validate()
    host = describe_host()
    model = prepare_model(model, settings)
    clock, memory = Clock(settings.device, settings.clock), PeakMemory(settings.device)
    combos = [(f, c) for c in settings.compressions for f in settings.frames]
    rows = []
    for frames, comp in tqdm(combos, desc="profile", unit="row", disable=not progress):
        rows.append(profile_row(model, frames, comp, settings, clock=clock, memory=memory))
    if settings.device == "cpu":
        timer = "time.process_time (CPU time of this process)" if settings.clock == "cpu" else "time.perf_counter"
    else:
        timer = "cuda events"
    return {
        "source": source,
        "settings": settings.as_dict(),
        "timer": timer,
        "peak_memory_kind": memory.kind,
        "cpu_allocator": allocator_state(),
        "total_ms_definition": "vision_tower_ms + projector_ms + llm_prefill_ms + decode_tokens * decode_ms_per_token",
        "host": host,
        "load_average_end": load_average(),
        "model": _model_info(model),
        "rows": rows,
    }
