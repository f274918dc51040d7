"""The training logs on rank 0: metrics.jsonl (plus TensorBoard scalars when it is installed) and
skipped_media.jsonl (one row per record skipped: step, record `file:line`, id, cause).

A resumed run first drops the rows a killed run logged past the checkpoint it resumes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from storm_vlm.utils import atomic_write_text

METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped_media.jsonl"


class MetricsLog:
    """A JSONL log of rows with a "step" (rank 0), plus TensorBoard scalars when asked and installed."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int,
                 name: str = METRICS_FILE):
        self.path = output_dir / name
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A killed run may have logged steps past the checkpoint we resume from: drop them.
        # Anything that is not a row (a line cut by the kill, garbage) is dropped too.
        if self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n"):
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                step = row.get("step") if isinstance(row, dict) else None
                if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        if tensorboard:
            try:  # optional: TensorBoard is not a dependency
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed
                self.tb = None
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k == "lr":
                    for g, lr in v.items():
                        self.tb.add_scalar(f"lr/{g}", lr, step)
                elif isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()
