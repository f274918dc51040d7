"""The one record type every benchmark reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field

from storm_vlm.choices import LETTERS


@dataclass(frozen=True)
class Record:
    """One multiple-choice question about one video.

    id: unique within the benchmark (the key of predictions.jsonl).
    video: absolute path of the video file, or of a folder of frame images
        (MVBench's episodic_reasoning ships TVQA frames extracted at ``frames_fps``).
    question: the question text, without options.
    options: the option texts *without* letter prefixes ("Apples", not "A. Apples").
    answer: 0-based index of the correct option; None where the benchmark keeps it secret.
    start, end: optional segment of the video to read, in seconds.
    categories: the fields results are broken down by (e.g. {"duration": "short"}).
    frames_fps: for a frame folder, the rate its frames were extracted at.
    """

    id: str
    benchmark: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    start: float | None = None
    end: float | None = None
    categories: dict[str, str] = field(default_factory=dict)
    frames_fps: float | None = None

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]
