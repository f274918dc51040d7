"""Token-budget planner: how many frames, at which test-time sampling, fit the LLM's context.

A video of M minutes can be read as many frames at a large sampling stride s or as fewer frames at
a small one. Temporal pooling k and spatial pooling p are trained with the model, so they are the
model's own; the sampling stride s is a test-time choice (the paper's uniform temporal token
sampling). For each candidate (frames, s) the planner counts the visual tokens with the model's
`StormConfig.num_visual_tokens` (the one place that counts them), checks that visual + text +
answer tokens fit the context, and predicts with `storm_vlm.perf.costmodel` the prefill time (the
vision tower and the projector on every frame, the LLM over the visual and text tokens) on a stated
roofline (`Hardware`; default an A100-80GB at 50 % of its bf16 peak, flash attention counting the
causal triangle) and the memory (weights + the largest live activations, KV cache included, + the
KV of the answer). It picks the option with the most frames that fits (and, where given, within a
prefill-time budget), then the smallest stride.

`fit_stride` is the same rule for one request with a fixed frame count: the smallest stride at or
above the one asked for that fits. `storm-vlm chat` and the server's engine use it when a request
asks for more frames than fit, instead of failing; they report the stride applied.

Pure arithmetic on a config (no weights, no tensors); this module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from storm_vlm.errors import StormError
from storm_vlm.utils import check_int, check_positive

__all__ = ["PlanOption", "Plan", "plan", "fit_stride", "frame_candidates", "format_bytes", "DEFAULT_STRIDES",
           "MAX_FRAMES", "MAX_STRIDE", "context_of"]

DEFAULT_STRIDES = (1, 2, 4, 8)
MAX_STRIDE = 64  # what the server accepts for temporal_sample_stride
MAX_FRAMES = 2**20  # over nine hours at 30 fps; the cost model's per-chunk arithmetic stays instant up to here


def context_of(config) -> int:
    """The LLM's positions (`max_position_embeddings` of the text config); StormError if it names none."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not limit:
        raise StormError("the model's LLM config has no max_position_embeddings: give the context size")
    return int(limit)


@dataclass(frozen=True)
class PlanOption:
    """One way to read the video. `fps`: frames per second of video (None without a duration);
    `prefill_s`: predicted vision tower + projector + LLM prefill on the plan's hardware;
    `memory_bytes`: weights + peak activations (KV cache included) + the answer's KV."""

    frames: int
    temporal_pool: int
    spatial_pool: int
    sample_stride: int
    visual_tokens: int
    total_tokens: int
    fits: bool
    fps: float | None
    prefill_s: float
    memory_bytes: float
    kv_bytes: float


@dataclass
class Plan:
    options: list[PlanOption]
    chosen: PlanOption | None
    context: int
    text_tokens: int
    answer_tokens: int
    hardware: str
    minutes: float | None
    max_prefill_s: float | None = None

    def as_dict(self) -> dict:
        return {"context": self.context, "text_tokens": self.text_tokens, "answer_tokens": self.answer_tokens,
                "hardware": self.hardware, "minutes": self.minutes, "max_prefill_s": self.max_prefill_s,
                "chosen": None if self.chosen is None else asdict(self.chosen),
                "options": [asdict(o) for o in self.options]}

    def table(self) -> str:
        """A readable table of every option, the chosen one marked."""
        head = ("| frames | fps | pool k | spatial p | sample s | visual tokens | total / context | fits "
                "| prefill s | memory |  |")
        lines = [head, "|" + "---:|" * 10 + "---|"]
        for o in self.options:
            fps = "" if o.fps is None else (f"{o.fps:.3g}")
            mark = "**picked**" if o is self.chosen else ""
            lines.append(f"| {o.frames} | {fps} | {o.temporal_pool} | {o.spatial_pool} | {o.sample_stride} "
                         f"| {o.visual_tokens} | {o.total_tokens} / {self.context} | {'yes' if o.fits else 'no'} "
                         f"| {o.prefill_s:.3g} | {format_bytes(o.memory_bytes)} | {mark} |")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """A byte count as GB (or MB below 1 GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def frame_candidates(minutes: float | None = None, max_frames: int = 1024, max_fps: float = 2.0,
                     min_frames: int = 8) -> list[int]:
    """Frame counts to consider: powers of two from `min_frames` up to `max_frames`, no more than
    `minutes` of video holds at `max_fps` (that count itself is a candidate when it is smaller)."""
    check_int("max_frames", max_frames, 1, MAX_FRAMES, error=StormError)
    check_positive("max_fps", max_fps, StormError)
    cap = max_frames
    if minutes is not None:
        check_positive("minutes", minutes, StormError)
        cap = max(1, int(min(cap, minutes * 60 * max_fps)))  # min first: int() refuses the inf a huge `minutes` gives
    out = []
    n = min_frames
    while n <= cap:
        out.append(n)
        n *= 2
    if not out or out[-1] != cap:
        out.append(cap)
    return sorted(set(out))


def _option(config, frames, stride, context, text_tokens, answer_tokens, minutes, hardware, bytes_per_el):
    from storm_vlm.perf.costmodel import Compression, kv_bytes_per_token, param_counts, pipeline_cost

    k, p = config.temporal_pool_size, config.spatial_pool_stride
    compression = Compression(k * stride * p * p, k, stride, p)
    visual = config.num_visual_tokens(frames, stride)
    total = visual + text_tokens + answer_tokens
    cost = pipeline_cost(config, frames, compression, text_tokens, answer_tokens, bytes_per_el, causal=True)
    prefill = hardware.seconds(cost.vision_tower) + hardware.seconds(cost.projector) + hardware.seconds(cost.llm_prefill)
    weights = param_counts(config)["total"] * bytes_per_el
    answer_kv = kv_bytes_per_token(config, bytes_per_el) * answer_tokens
    peak = max(cost.vision_tower.activation_bytes, cost.projector.activation_bytes, cost.llm_prefill.activation_bytes)
    kv = kv_bytes_per_token(config, bytes_per_el) * total
    fps = None if minutes is None else frames / (minutes * 60)
    return PlanOption(frames, k, p, stride, visual, total, total <= context, fps, prefill, weights + peak + answer_kv,
                      kv)


def plan(config, context: int | None = None, *, minutes: float | None = None, frames: list[int] | None = None,
         strides=DEFAULT_STRIDES, text_tokens: int = 128, answer_tokens: int = 256, max_frames: int = 1024,
         max_fps: float = 2.0, hardware=None, bytes_per_el: int = 2, max_prefill_s: float | None = None) -> Plan:
    """Every (frames, stride) option for a `StormConfig`, and the one to pick.

    context: the LLM's positions to fill (default, and at most: its max_position_embeddings); frames: the frame
    counts to consider (default `frame_candidates(minutes, max_frames, max_fps)`); text_tokens: the
    prompt's text (template + question); answer_tokens: room kept for the answer; hardware: a
    `storm_vlm.perf.costmodel.Hardware` (default A100_80GB); max_prefill_s: also require the
    predicted prefill to stay within this. The pick: the most frames that fit, then the smallest
    stride; None when nothing fits.
    """
    from storm_vlm.perf.costmodel import A100_80GB

    hardware = hardware or A100_80GB
    if context is None:
        context = context_of(config)
    else:
        check_int("context", context, 1, error=StormError)
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if limit and context > limit:  # past its last position the LLM has no trained positions: nothing "fits"
            raise StormError(f"--context {context} is more than the model's LLM has positions for "
                             f"(max_position_embeddings {limit}): give at most {limit}")
    check_int("text_tokens", text_tokens, 0, error=StormError)
    check_int("answer_tokens", answer_tokens, 0, error=StormError)
    if max_prefill_s is not None:
        check_positive("max_prefill_s", max_prefill_s, StormError)
    # strides past MAX_STRIDE would be advice that `chat` and the server refuse
    strides = sorted({check_int("stride", s, 1, MAX_STRIDE, error=StormError) for s in strides})
    frames = frame_candidates(minutes, max_frames, max_fps) if frames is None else sorted(
        {check_int("frames", f, 1, MAX_FRAMES, error=StormError) for f in frames})
    options = []
    for f in frames:
        seen = set()
        for s in strides:  # a stride past the last pooled frame gives the same tokens as a smaller one: skipped
            visual = config.num_visual_tokens(f, s)
            if visual not in seen:
                seen.add(visual)
                options.append(_option(config, f, s, context, text_tokens, answer_tokens, minutes, hardware,
                                       bytes_per_el))
    ok = [o for o in options if o.fits and (max_prefill_s is None or o.prefill_s <= max_prefill_s)]
    chosen = max(ok, key=lambda o: (o.frames, -o.sample_stride), default=None)
    return Plan(options, chosen, context, text_tokens, answer_tokens, hardware.name, minutes, max_prefill_s)


def fit_stride(config, frame_counts, other_tokens: int, stride: int | None = None, context: int | None = None,
               max_stride: int = MAX_STRIDE) -> int:
    """The smallest test-time sampling stride, at or above `stride` (None: the model's default),
    with which videos of `frame_counts` frames plus `other_tokens` (text + answer) fit `context`
    positions (default: the LLM's). StormError naming the numbers when even `max_stride` does not."""
    context = context_of(config) if context is None else context
    start = config.temporal_sample_stride if stride is None else stride
    counts = [int(t) for t in frame_counts]
    for s in range(start, max(start, max_stride) + 1):
        visual = sum(config.num_visual_tokens(t, s) for t in counts)
        if visual + other_tokens <= context:
            return s
    least = sum(config.num_visual_tokens(t, max(start, max_stride)) for t in counts)
    raise StormError(f"the request does not fit the LLM's {context} positions even at temporal sampling stride "
                     f"{max(start, max_stride)}: {least} visual tokens + {other_tokens} text and answer tokens; "
                     "ask for fewer frames or fewer new tokens")
