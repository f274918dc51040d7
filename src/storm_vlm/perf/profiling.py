"""Per-module latency of a STORM model: vision tower, projector (+ compression), LLM prefill, decode.

One row per (frames, compression). Each row runs the model's own public path on random pixels:

1. `model.get_video_features(pixels (1, T, 3, H, W), temporal_sample_stride=s)` — forward hooks on
   `model.projector` split it into **vision tower** (everything before the projector starts: the
   chunked SigLIP calls) and **projector** (pixel shuffle + Mamba/MLP + temporal/spatial pooling +
   temporal sampling, up to the return);
2. **LLM prefill**: `model(inputs_embeds=[text | visual tokens | text], use_cache=True,
   logits_to_keep=1)`;
3. **decode**: greedy one-token steps `model(input_ids=(1, 1), cache=...)` on the prefill's KV cache
   (the cache is cropped back to the prefill length between repeats).

Steps 1-2 run `warmup` + `repeats` times and the medians are kept; decode runs `warmup` + `repeats`
rounds of `decode_tokens` steps and keeps the median step. Timing uses CUDA events on GPU and
`time.perf_counter` on CPU. `total_ms` = vision + projector + prefill + decode_tokens x decode step:
the latency of answering with `decode_tokens` tokens.

Compression c (see `storm_vlm.perf.costmodel.DEFAULT_COMPRESSIONS`): 1 = none, 4 = temporal pool 4,
8 = temporal pool 4 + temporal sample 2; custom settings as "16=4:2:2" (pool:sample:spatial). The
pooling sizes are switched on the model's config for the row and restored afterwards: this changes
what a model trained with other pooling computes (not its cost), so rows measure latency only.

Each row also carries `gflop` (per module, from `storm_vlm.perf.costmodel`, attention counted dense)
and `gflop_per_s` (the rate each module reached), and `page_faults` (minor faults during the row).

CPU allocator: `storm_vlm.perf.allocator.tune_cpu_allocator()` (called by every `storm-vlm` command and the benchmarks unless
`--no-tune-malloc`) makes glibc reuse freed memory instead of mapping fresh, page-faulting pages
for every large tensor; `cpu_allocator` in the result says whether it was on. The KV cache and
decode attention are the model's own (`StormKVCache`, `storm_sdpa`; see `storm_vlm.model.modeling`).

Peak memory: CUDA `max_memory_allocated` (reset per row); on CPU the process's resident-set
high-water mark, reset per row through /proc/self/clear_refs (Linux), so each row's peak is its
own (it includes the weights and everything else resident; `memory_baseline_mb` is the RSS when
the row started). Where the reset is unavailable the process-lifetime peak is reported and the
metadata says so. Rows whose estimated activations (from `storm_vlm.perf.costmodel`) exceed the free
memory, or that run out of memory, are skipped with a note instead of crashing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from storm_vlm.perf.costmodel import Compression, DEFAULT_COMPRESSIONS, pipeline_cost
from storm_vlm.perf.allocator import _ALLOCATOR_STATE, tune_cpu_allocator  # noqa: F401  (re-exported)
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.precision import Precision, resolve_precision

__all__ = [
    "ProfileSettings",
    "load_model_config",
    "build_random_model",
    "load_model",
    "profile_model",
    "profile_row",
    "prefill_video",
    "decode_latency",
    "format_table",
    "plot_profile",
    "write_profile",
    "ROW_FIELDS",
    "tune_cpu_allocator",
    "page_faults",
    "measure_cpu_roofline",
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


@dataclass
class ProfileSettings:
    """What to measure. `compressions` are `costmodel.Compression`s; `precision` a name of
    `storm_vlm.precision.PRECISIONS` (resolved on `device`)."""

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
        if not self.frames or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.frames):
            raise StormError(f"--frames must be positive integers, got {self.frames}")
        for name, minimum in (("repeats", 1), ("warmup", 0), ("decode_tokens", 0), ("text_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise StormError(f"--{name.replace('_', '-')} must be an int >= {minimum}, got {value!r}")
        resolve_precision(self.precision, self.device)  # StormError for a bad name or float16 on CPU
        if self.clock not in ("wall", "cpu"):
            raise StormError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.device not in ("cpu", "cuda"):
            raise StormError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise StormError("--device cuda: no CUDA device is available (use --device cpu)")


# ---- building / loading the model -------------------------------------------------------------


def load_model_config(path) -> tuple:
    """Read a profile YAML (`model:` = StormConfig fields, optional `profile:` defaults).

    Returns (StormConfig, profile_defaults dict). Raises ConfigError naming the file on any problem.
    """
    import yaml

    from storm_vlm.model.configuration import StormConfig

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{path}: needs a `model:` mapping of StormConfig fields")
    defaults = raw.get("profile") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: `profile:` must be a mapping")
    unknown = set(defaults) - {"text_tokens", "decode_tokens", "frames", "compression", "repeats", "warmup"}
    if unknown:
        raise ConfigError(f"{path}: unknown `profile:` keys {sorted(unknown)}")
    try:
        config = StormConfig(**raw["model"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid model config ({exc})") from None
    return config, defaults


def build_random_model(config, seed: int = 0):
    """A randomly initialised `StormForConditionalGeneration` for `config`, in eval mode."""
    from storm_vlm.model.modeling import StormForConditionalGeneration

    torch.manual_seed(seed)
    return StormForConditionalGeneration(config).eval()


def load_model(model_dir):
    """`StormForConditionalGeneration.from_pretrained(model_dir)` (local files only), in eval mode."""
    from storm_vlm.model.modeling import StormForConditionalGeneration

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise StormError(f"{path}: not a STORM model folder (no config.json)")
    try:
        return StormForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise StormError(f"{path}: cannot load the model ({exc})") from None


# ---- timing and memory ------------------------------------------------------------------------


class _Clock:
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


def proc_status_kb(key: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...); None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) through /proc/self/clear_refs; False where unsupported."""
    if proc_status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_cpu_roofline(matmul_size: int = 1024, stream_mb: int = 256, repeats: int = 5):
    """This CPU's roofline with the current torch threads: a `costmodel.Hardware` with mfu 1.

    peak_flops: the best of `repeats` fp32 (n x n) @ (n x n) matmuls; bandwidth: the best of
    `repeats` streaming reads (a sum) of a `stream_mb` MB fp32 tensor, as a decode step streams its
    weights. Best-of, not median: a bound is what the machine can do, and other jobs only slow it.
    """
    from storm_vlm.perf.costmodel import Hardware

    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    x = torch.ones(stream_mb * 2**20 // 4)
    a @ b
    x.sum()
    best_mm = best_rd = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - t)
        t = time.perf_counter()
        x.sum()
        best_rd = min(best_rd, time.perf_counter() - t)
    flops = 2 * matmul_size**3 / best_mm
    bandwidth = x.numel() * 4 / best_rd
    return Hardware(f"this CPU (fp32, {torch.get_num_threads()} thread(s): {flops / 1e9:.0f} GFLOP/s, "
                    f"{bandwidth / 1e9:.1f} GB/s)", peak_flops=flops, bandwidth=bandwidth, mfu=1.0)


def page_faults() -> int:
    """Minor page faults of this process so far (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Memory:
    """Per-row peak memory: CUDA allocator peak, or the CPU RSS high-water mark.

    `trim` (CPU): give the freed heap back to the kernel before each row, so the row's peak RSS is
    its own; without it the next run reuses the warm heap (no page faults) and the peak includes
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
        """Start a row; returns the memory in use now (MB)."""
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
        rss = proc_status_kb("VmRSS")
        return (rss or 0) / 1024

    def peak(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        if self.kind == "rss_high_water_mark_per_row":
            return proc_status_kb("VmHWM") / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20

    def free_bytes(self) -> float:
        if self.device == "cuda":
            return float(torch.cuda.mem_get_info()[0])
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
        except OSError:
            pass
        return math.inf


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---- one row ----------------------------------------------------------------------------------


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

    def __init__(self, model, clock: _Clock):
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


def profile_row(model, frames: int, compression: Compression, settings: ProfileSettings, *, clock=None, memory=None) -> dict:
    """Measure one (frames, compression) row; returns a dict with ROW_FIELDS (+ details, or `skipped`)."""
    clock = clock or _Clock(settings.device, settings.clock)
    memory = memory or _Memory(settings.device)
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
        est = pipeline_cost(cfg, frames, compression, settings.text_tokens, settings.decode_tokens, bytes_per_el)
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


def _achieved(row: dict, est) -> dict:
    """Each module's FLOPs (storm_vlm.perf.costmodel, attention counted dense) and the rate reached."""
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


def _autocast(settings: ProfileSettings):
    return settings.resolved.context()


def _inputs(model, frames: int, settings: ProfileSettings):
    """Random pixels (1, T, 3, H, W) and prompt ids (1, text_tokens), seeded."""
    gen = torch.Generator().manual_seed(settings.seed)
    vc = model.config.vision_config
    pixels = torch.randn(1, frames, vc.num_channels, vc.image_size, vc.image_size, generator=gen)
    text = _text_ids(model, settings.text_tokens, gen)
    return pixels.to(settings.device), text.to(settings.device)


def _prefill(model, pixels, text, compression: Compression, visual: int, clock: _Clock):
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


def _decode(model, cache, token, steps: int, clock: _Clock) -> list[float]:
    """`steps` greedy one-token steps on `cache` (grown in place), then cropped back. Returns ms per step."""
    start = cache.get_seq_length()
    times = []
    for _ in range(steps):
        clock.sync()
        s0 = clock.mark()
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        s1 = clock.mark()
        times.append(clock.ms(s0, s1))
    extra = cache.get_seq_length() - start
    if extra:
        cache.crop(-extra)
    return times


def prefill_video(model, frames: int, compression: Compression, settings: ProfileSettings):
    """Run one (untimed) prefill of a random `frames`-frame video; returns (kv cache, next token (1, 1)).

    For benchmarks that time decoding on several caches in turn: pass the results to `decode_latency`.
    The model must already be on `settings.device` in the right dtype (see `profile_model`).
    """
    with _compression_on(model, compression), torch.inference_mode(), _autocast(settings):
        visual = model.config.num_visual_tokens(frames, temporal_sample_stride=compression.temporal_sample)
        pixels, text = _inputs(model, frames, settings)
        out, _ = _prefill(model, pixels, text, compression, visual, _Clock(settings.device, settings.clock))
        return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_latency(model, cache, token, steps: int, settings: ProfileSettings) -> list[float]:
    """Milliseconds of each of `steps` greedy decode steps on `cache`; the cache is cropped back after."""
    with torch.inference_mode(), _autocast(settings):
        return _decode(model, cache, token, steps, _Clock(settings.device, settings.clock))


def _measure(model, frames, compression, visual, settings, clock, memory) -> dict:
    pixels, text = _inputs(model, frames, settings)
    baseline = memory.reset()
    faults0 = page_faults()
    hook = _ProjectorStart(model, clock)
    vision_ms, projector_ms, prefill_ms = [], [], []
    cache = None
    try:
        with torch.inference_mode(), _autocast(settings):
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
                    times = _decode(model, cache, next_token, settings.decode_tokens, clock)
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


# ---- the whole profile ------------------------------------------------------------------------


def _hardware(device: str) -> dict:
    info = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    return info


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
    """Profile every frames x compression row; returns {"settings", "hardware", "model", "rows", ...}."""
    from tqdm.auto import tqdm

    settings.validate()
    model.to(device=settings.device, dtype=settings.resolved.weights)
    model.eval()
    clock, memory = _Clock(settings.device, settings.clock), _Memory(settings.device)
    combos = [(f, c) for c in settings.compressions for f in settings.frames]
    rows = []
    for frames, comp in tqdm(combos, desc="profile", unit="row", disable=not progress):
        rows.append(profile_row(model, frames, comp, settings, clock=clock, memory=memory))
    s = asdict(settings)
    s["compressions"] = [asdict(c) | {"label": c.label} for c in settings.compressions]
    s["compute_dtype"] = settings.resolved.describe()
    return {
        "source": source,
        "settings": s,
        "timer": "cuda events" if settings.device == "cuda" else (
            "time.process_time (CPU time of this process)" if settings.clock == "cpu" else "time.perf_counter"),
        "peak_memory_kind": memory.kind,
        "cpu_allocator": dict(_ALLOCATOR_STATE),
        "total_ms_definition": "vision_tower_ms + projector_ms + llm_prefill_ms + decode_tokens * decode_ms_per_token",
        "hardware": _hardware(settings.device),
        "model": _model_info(model),
        "rows": rows,
    }


# ---- reporting --------------------------------------------------------------------------------


def _pct(part, whole) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "   - "


def format_table(result: dict) -> str:
    """A table shaped like the paper's Table 13: ms and % share per module, per row."""
    s = result["settings"]
    k = s["decode_tokens"]
    head = (
        f"per-module latency ({s['device']}, {s['compute_dtype']}; median of {s['repeats']} after "
        f"{s['warmup']} warm-up; llm = prefill + {k} decoded tokens; peak memory: {result['peak_memory_kind']})"
    )
    cols = f"{'frames':>6} {'comp':>11} {'tokens':>7} | {'vision_tower ms':>19} | {'projector ms':>17} | " \
           f"{'llm ms':>19} | {'prefill ms':>10} {'decode ms/tok':>13} | {'total ms':>10} {'peak MB':>9}"
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        label = f"{r['compression']}x" if r["compression"] != 1 else "1 (none)"
        if r.get("skipped"):
            lines.append(f"{r['frames']:>6} {label:>11} {r['visual_tokens']:>7} | {r['note']}")
            continue
        llm = r["llm_prefill_ms"] + k * r["decode_ms_per_token"]
        tot = r["total_ms"]
        lines.append(
            f"{r['frames']:>6} {label:>11} {r['visual_tokens']:>7} | "
            f"{r['vision_tower_ms']:>11.1f} ({_pct(r['vision_tower_ms'], tot)}) | "
            f"{r['projector_ms']:>9.1f} ({_pct(r['projector_ms'], tot)}) | "
            f"{llm:>11.1f} ({_pct(llm, tot)}) | "
            f"{r['llm_prefill_ms']:>10.1f} {r['decode_ms_per_token']:>13.2f} | {tot:>10.1f} {r['peak_memory_mb']:>9.1f}"
        )
    return "\n".join(lines)


def plot_profile(result: dict, out_dir) -> list[Path]:
    """latency_vs_frames.png (total and prefill per compression) and breakdown.png (stacked modules
    at the largest frame count measured for every compression). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = [r for r in result["rows"] if not r.get("skipped")]
    comps = sorted({r["compression"] for r in result["rows"]})
    k = result["settings"]["decode_tokens"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in comps:
        rs = sorted((r for r in rows if r["compression"] == c), key=lambda r: r["frames"])
        if not rs:
            continue
        line, = ax.plot([r["frames"] for r in rs], [r["total_ms"] for r in rs], marker="o", label=f"{c}x total")
        ax.plot([r["frames"] for r in rs], [r["vision_tower_ms"] + r["projector_ms"] + r["llm_prefill_ms"] for r in rs],
                linestyle="--", color=line.get_color(), alpha=0.7, label=f"{c}x to first token")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"STORM latency vs frames ({result['settings']['device']}, {k} decoded tokens)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "latency_vs_frames.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    measured = [{r["frames"] for r in rows if r["compression"] == c} for c in comps]
    common = set.intersection(*measured) if measured and all(measured) else set()
    frames = max(common) if common else (max(r["frames"] for r in rows) if rows else None)
    parts = [("vision_tower_ms", "vision tower"), ("projector_ms", "projector"), ("llm_prefill_ms", "LLM prefill")]
    if frames is not None:
        sel = [next((r for r in rows if r["compression"] == c and r["frames"] == frames), None) for c in comps]
        xs = [f"{c}x" for c in comps]
        bottom = [0.0] * len(comps)
        for key, name in parts + [("decode", f"decode x{k}")]:
            vals = [0.0 if r is None else (k * r["decode_ms_per_token"] if key == "decode" else r[key]) for r in sel]
            ax.bar(xs, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"module breakdown at {frames} frames")
    ax.set_xlabel("compression")
    ax.set_ylabel("latency (ms)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "breakdown.png"))
    plt.close(fig)
    return written


def _save_fig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def write_profile(result: dict, out_dir) -> Path:
    """Write OUT/profile.json and OUT/profile.txt (the table) atomically; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "profile.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    table = out_dir / "profile.txt"
    tmp = table.with_name(table.name + ".tmp")
    tmp.write_text(format_table(result) + "\n")
    os.replace(tmp, table)
    return path
