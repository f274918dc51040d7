"""What the demo runs: sizes, data, training budget, the table's rows and the paper's claims.

`DemoSettings.default()` is the `make demo` experiment; `DemoSettings.tiny_preset()` the
seconds-long smoke run the test suite uses. Every trained variant shares the same synthetic
data, model sizes, steps, learning rate and seeds; only the projector (type, direction), the
number of input frames and the temporal pooling differ, and all of them give the LLM the same
number of visual tokens (`base_frames` frames' worth).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from storm_vlm.demo.synth_tasks import TASKS
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int


@dataclass(frozen=True)
class Variant:
    """One trained model: projector type, frames it is trained on, trained temporal pooling k."""

    name: str
    label: str
    projector: str  # "mamba" | "mlp"
    frames_factor: int  # trained on frames_factor * base_frames frames
    temporal_pool: int
    bidirectional: bool = True  # Mamba projector only: False is the causal (unidirectional) sweep


@dataclass(frozen=True)
class Row:
    """One evaluated setting of a trained variant (a line of the results table).

    input_frames = frames_factor * base_frames of the variant divided by `frames_div`;
    `sample` is the test-time temporal sampling stride s.
    """

    name: str
    variant: str
    label: str
    frames_div: int = 1
    sample: int = 1
    note: str = ""


@dataclass(frozen=True)
class Claim:
    """A claim of the paper, tested as the paired gap `row_a` - `row_b` (see storm_vlm.demo.stats).

    scopes: where the gap is measured: "average" (over all tasks), "within-window" (over the
    tasks whose answer lives inside one pooling window), or a task name. paper: the paper's own
    figures (arXiv 2503.04130v4; averages over MVBench, MLVU, LongVideoBench and VideoMME unless named).
    """

    name: str
    statement: str
    row_a: str
    row_b: str
    scopes: tuple[str, ...]
    paper: str


# Tasks whose answer lives inside one temporal pooling window (storm_vlm.demo.synth_tasks).
WITHIN_WINDOW = ("flash_order", "step")

VARIANTS: tuple[Variant, ...] = (
    Variant("vila", "VILA (MLP projector)", "mlp", 1, 1),
    Variant("storm", "STORM (Mamba projector)", "mamba", 1, 1),
    Variant("vila_pool4", "VILA + temporal pool k=4", "mlp", 4, 4),
    Variant("storm_pool4", "STORM + temporal pool k=4", "mamba", 4, 4),
    Variant("storm_causal_pool4", "STORM causal + temporal pool k=4", "mamba", 4, 4, bidirectional=False),
)

# The table, in the order printed. Rows with the same token budget can be compared directly.
ROWS: tuple[Row, ...] = (
    Row("vila", "vila", "VILA", note="trained setting"),
    Row("vila_raw_half", "vila", "VILA, half the frames (raw subsampling)", frames_div=2,
        note="uniformly sampled raw frames, half the tokens"),
    Row("storm", "storm", "STORM", note="trained setting"),
    Row("storm_s2", "storm", "STORM + test-time sampling s=2", sample=2,
        note="same frames as trained, every 2nd frame's tokens kept: half the tokens"),
    Row("vila_pool4", "vila_pool4", "VILA + temporal pool k=4", note="trained setting"),
    Row("storm_pool4", "storm_pool4", "STORM + temporal pool k=4", note="trained setting"),
    Row("storm_causal_pool4", "storm_causal_pool4", "STORM causal + temporal pool k=4", note="trained setting"),
)

CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "STORM + pool > VILA + pool (temporal pool k=4, same token budget)", "storm_pool4", "vila_pool4",
          ("within-window", "average"),
          paper="Table 10: 128 frames + T. pooling, STORM 66.7 vs VILA 64.3 (+2.4); 32 frames 64.2 vs 63.5 (+0.7)"),
    Claim("C2", "test-time sampling after mixing beats raw subsampling at the same token count "
          "(STORM + s=2 vs VILA on half the frames)", "storm_s2", "vila_raw_half", ("average",),
          paper="Tables 2, 5: STORM + T. sampling at 50 % tokens 64.7 vs VILA at 100 % tokens 63.9 "
                "(VILA on half the raw frames: not reported)"),
    Claim("C3", "temporal pooling over 4x the frames beats 1x the frames at the same budget "
          "(STORM + pool k=4 vs STORM)", "storm_pool4", "storm", ("average",),
          paper="Table 3: T. pooling, 32 -> 128 frames at the same budget: LongVideoBench 54.2 -> 59.5, "
                "VideoMME 61.2 -> 63.4"),
    Claim("C4", "STORM >= VILA without compression", "storm", "vila", ("average",),
          paper="Tables 2, 5: 32 frames, all tokens: STORM 64.6 vs VILA 63.9 (VideoMME +2.3)"),
    Claim("C5", "bidirectional > causal (unidirectional) Mamba projector, both + pool k=4",
          "storm_pool4", "storm_causal_pool4", ("within-window", "average"),
          paper="Table 7 (VideoMME): bidirectional 63.4 vs causal 62.5 at 128 frames + T. pooling; "
                "61.2 vs 62.2 at 32 frames"),
)

VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers (written to results.json)."""

    # synthetic benchmark (storm_vlm.demo.synth.generate_synthetic_benchmark)
    data_seed: int = 0
    train_per_task: int = 240
    test_per_task: int = 300  # binomial 95 % half-width <= 5.7 points per task and seed (<= 3.3 over 3 seeds)
    video_frames: int = 16
    video_size: int = 32
    # flash_order lives inside one pooling window; transient (one flash among 16 frames) needs every
    # frame; static is the control. `step` is available but not learned within this budget.
    tasks: tuple[str, ...] = ("flash_order", "transient", "static")
    # tiny model (storm_vlm.demo.tiny.make_tiny_parts + StormConfig); random init, nothing pretrained.
    # 8 px patches at 32 px: 4 visual tokens per frame after the 2x2 pixel shuffle.
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_init_std: float = 0.1
    projector_layers: int = 2
    # training (storm_vlm.train, stage "sft"); the vision tower stays frozen at its random init
    base_frames: int = 4
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    lr_scheduler: str = "constant"  # linear warm-up then constant
    train_parts: tuple[str, ...] = ("projector", "language_model")
    answer_format: str = "text"  # the training targets: "text" (the option's text) or "letter"
    # evaluation
    max_new_tokens: int = 4
    eval_batch_size: int = 32
    latency_repeats: int = 5
    tiny: bool = False

    @classmethod
    def default(cls, **overrides) -> "DemoSettings":
        return cls(**overrides)

    @classmethod
    def tiny_preset(cls, **overrides) -> "DemoSettings":
        base = dict(train_per_task=8, test_per_task=6, video_frames=16, tasks=("flash_order", "static"),
                    vision_hidden=16, llm_hidden=32, llm_layers=1, llm_heads=2, llm_kv_heads=1,
                    projector_layers=1, base_frames=4, steps=30, batch_size=4, learning_rate=1e-2,
                    warmup_ratio=0.1, latency_repeats=1, tiny=True)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "DemoSettings":
        ints = {"train_per_task": 1, "test_per_task": 1, "video_frames": 16, "video_size": 32, "base_frames": 1,
                "steps": 1, "batch_size": 1, "max_new_tokens": 1, "eval_batch_size": 1,
                "latency_repeats": 1}
        for key, minimum in ints.items():
            check_int(f"demo setting {key}", getattr(self, key), minimum, error=StormError)

        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise StormError(f"--tasks {','.join(self.tasks)!r}: must be distinct names among {', '.join(TASKS)}")
        if self.answer_format not in ("text", "letter"):
            raise StormError(f"demo setting answer_format={self.answer_format!r}: must be 'text' or 'letter'")
        for key in ("learning_rate", "llm_init_std"):
            if not getattr(self, key) > 0:
                raise StormError(f"demo setting {key}={getattr(self, key)!r}: must be > 0")
        if self.video_size % self.patch_size or (self.video_size // self.patch_size) % 2:
            raise StormError(
                f"demo setting video_size={self.video_size}: must be a multiple of 2 x patch_size ({self.patch_size})"
            )
        return self

    # ---- derived -------------------------------------------------------------------------------

    def trained_frames(self, variant: Variant) -> int:
        return self.base_frames * variant.frames_factor

    def input_frames(self, row: Row) -> int:
        frames = self.trained_frames(VARIANT_BY_NAME[row.variant])
        if frames % row.frames_div:
            raise StormError(f"row {row.name}: {frames} frames do not divide by {row.frames_div}")
        return frames // row.frames_div

    def parts_kwargs(self, seed: int) -> dict:
        """kwargs of storm_vlm.demo.tiny.make_tiny_parts (weights seeded by the training seed)."""
        return dict(image_size=self.video_size, patch_size=self.patch_size, vision_hidden=self.vision_hidden,
                    vision_layers=self.vision_layers, vision_heads=max(1, self.vision_hidden // 16),
                    llm_hidden=self.llm_hidden, llm_layers=self.llm_layers, llm_heads=self.llm_heads,
                    llm_kv_heads=self.llm_kv_heads, llm_intermediate=2 * self.llm_hidden,
                    llm_init_std=self.llm_init_std, seed=seed)

    def synth_kwargs(self) -> dict:
        per_task = self.train_per_task + self.test_per_task
        return dict(num_videos=len(self.tasks) * per_task, num_frames=self.video_frames, size=self.video_size,
                    seed=self.data_seed, split=self.test_per_task / per_task, num_images=0, tasks=list(self.tasks),
                    answers=self.answer_format)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_parts"] = list(self.train_parts)
        d["tasks"] = list(self.tasks)
        return d

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
