"""What the demo runs: sizes, data, training budget, and the table's rows.

`DemoSettings.default()` is the ~10-minute experiment; `DemoSettings.tiny()` the seconds-long
smoke run the test suite uses. Every trained variant shares the same synthetic data, model
sizes, steps, learning rate and seed; only the projector type, the number of input frames and
the temporal pooling differ, and all of them give the LLM the same number of visual tokens
(`base_frames` frames' worth).
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


@dataclass(frozen=True)
class Row:
    """One evaluated setting of a trained variant (a line of the results table).

    input_frames = frames_factor * base_frames of the variant, times `frames_mult`, divided by
    `frames_div`; `sample` is the test-time temporal sampling stride s.
    """

    name: str
    variant: str
    label: str
    frames_mult: int = 1
    frames_div: int = 1
    sample: int = 1
    note: str = ""


VARIANTS: tuple[Variant, ...] = (
    Variant("vila", "VILA baseline (MLP projector)", "mlp", 1, 1),
    Variant("storm", "STORM (Mamba projector)", "mamba", 1, 1),
    Variant("storm_pool4", "STORM + temporal pool k=4", "mamba", 4, 4),
    Variant("vila_pool4", "VILA + temporal pool k=4", "mlp", 4, 4),
)

# The table, in the order printed. Rows with the same token budget can be compared directly.
ROWS: tuple[Row, ...] = (
    Row("vila", "vila", "VILA", note="trained setting"),
    Row("vila_raw_half", "vila", "VILA, half the frames (raw subsampling)", frames_div=2,
        note="uniformly sampled raw frames, half the tokens"),
    Row("vila_s2", "vila", "VILA + test-time sampling s=2", frames_mult=2, sample=2,
        note="2x frames in, every 2nd frame's tokens kept"),
    Row("storm", "storm", "STORM", note="trained setting"),
    Row("storm_s2_half", "storm", "STORM + test-time sampling s=2 (half the tokens)", sample=2,
        note="same frames as trained, every 2nd frame's tokens kept"),
    Row("storm_s2", "storm", "STORM + test-time sampling s=2", frames_mult=2, sample=2,
        note="2x frames in, every 2nd frame's tokens kept"),
    Row("storm_pool4", "storm_pool4", "STORM + temporal pool k=4", note="trained setting"),
    Row("storm_pool4_s2", "storm_pool4", "STORM + pool k=4 + sampling s=2", frames_mult=2, sample=2,
        note="2x frames in, every 2nd pooled frame kept"),
    Row("vila_pool4", "vila_pool4", "VILA + temporal pool k=4", note="trained setting"),
    Row("vila_pool4_s2", "vila_pool4", "VILA + pool k=4 + sampling s=2", frames_mult=2, sample=2,
        note="2x frames in, every 2nd pooled frame kept"),
)

VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers (written to results.json)."""

    # synthetic benchmark (storm_vlm.demo.synth.generate_synthetic_benchmark)
    data_seed: int = 0
    num_videos: int = 600
    video_frames: int = 128
    video_size: int = 32
    test_fraction: float = 0.2
    # The default trains and tests two tasks: with all five, the tiny from-scratch models stayed at
    # chance on every task within the budget (measured); see the README / demo notes.
    tasks: tuple[str, ...] = ("transient", "static")
    # tiny model (storm_vlm.demo.tiny.make_tiny_parts + StormConfig); random init, nothing pretrained
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    projector_layers: int = 2
    # training (storm_vlm.train, stage "sft")
    base_frames: int = 32
    steps: int = 250
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    lr_scheduler: str = "constant"  # linear warm-up then constant: the run is too short for a decay
    train_parts: tuple[str, ...] = ("projector", "language_model")
    answer_format: str = "text"  # the training targets: "text" (the option's text) or "letter"
    # evaluation
    max_new_tokens: int = 4
    latency_repeats: int = 5
    tiny: bool = False

    @classmethod
    def default(cls, **overrides) -> "DemoSettings":
        return cls(**overrides)

    @classmethod
    def tiny_preset(cls, **overrides) -> "DemoSettings":
        base = dict(num_videos=30, video_frames=16, video_size=32, vision_hidden=16, vision_layers=2,
                    llm_hidden=32, llm_layers=1, llm_heads=2, llm_kv_heads=1, projector_layers=1,
                    base_frames=4, steps=80, batch_size=4, learning_rate=1e-2, warmup_ratio=0.1,
                    latency_repeats=1, tiny=True, test_fraction=0.34)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "DemoSettings":
        ints = {"num_videos": 1, "video_frames": 16, "video_size": 32, "base_frames": 1, "steps": 1,
                "batch_size": 1, "max_new_tokens": 1, "latency_repeats": 1}
        for key, minimum in ints.items():
            check_int(f"demo setting {key}", getattr(self, key), minimum, error=StormError)

        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise StormError(f"--tasks {','.join(self.tasks)!r}: must be distinct names among {', '.join(TASKS)}")
        if self.answer_format not in ("text", "letter"):
            raise StormError(f"demo setting answer_format={self.answer_format!r}: must be 'text' or 'letter'")
        if not self.learning_rate > 0:
            raise StormError(f"demo setting learning_rate={self.learning_rate!r}: must be > 0")
        if self.video_size % self.patch_size or (self.video_size // self.patch_size) % 2:
            raise StormError(
                f"demo setting video_size={self.video_size}: must be a multiple of 2 x patch_size ({self.patch_size})"
            )
        return self

    # ---- derived -------------------------------------------------------------------------------

    def trained_frames(self, variant: Variant) -> int:
        return self.base_frames * variant.frames_factor

    def input_frames(self, row: Row) -> int:
        frames = self.trained_frames(VARIANT_BY_NAME[row.variant]) * row.frames_mult
        if frames % row.frames_div:
            raise StormError(f"row {row.name}: {frames} frames do not divide by {row.frames_div}")
        return frames // row.frames_div

    def parts_kwargs(self, seed: int) -> dict:
        """kwargs of storm_vlm.demo.tiny.make_tiny_parts (weights seeded by the training seed)."""
        return dict(image_size=self.video_size, patch_size=self.patch_size, vision_hidden=self.vision_hidden,
                    vision_layers=self.vision_layers, vision_heads=max(1, self.vision_hidden // 16),
                    llm_hidden=self.llm_hidden, llm_layers=self.llm_layers, llm_heads=self.llm_heads,
                    llm_kv_heads=self.llm_kv_heads, llm_intermediate=2 * self.llm_hidden, seed=seed)

    def synth_kwargs(self) -> dict:
        return dict(num_videos=self.num_videos, num_frames=self.video_frames, size=self.video_size,
                    seed=self.data_seed, split=self.test_fraction, num_images=0, tasks=list(self.tasks))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_parts"] = list(self.train_parts)
        d["tasks"] = list(self.tasks)
        return d

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
