"""predictions.jsonl: one JSON object per line, appended as each prediction is made.

Every line is flushed and fsync'd before the next question starts, so a killed run
loses at most the line being written. Reading tolerates exactly that: a last line with
no newline (or that does not parse) is dropped and cut off before appending again. Any
other unreadable line means the file was damaged some other way, and reading stops with
an error naming the file and line rather than guessing.

Every row read back is validated (`check_row`): `id` a non-empty string, `status` one of
answered / unparsed / decode_error / model_error, a text `reply` for the first two and a text
`error` (and no reply) for the failures, optional numbers finite. A row that fails is the same
error naming file and line. What a row's `pred`, `pred_letter` and `correct` say is never
trusted: scoring recomputes them from the stored reply and the benchmark's own answer
(`storm_vlm.eval.scoring.judge`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from storm_vlm.errors import StormError
from storm_vlm.utils import atomic_write_text

REPLIED = ("answered", "unparsed")  # the model replied (a letter was read / none was)
FAILURES = ("decode_error", "model_error")  # no reply: the video could not be read / the model raised
STATUSES = (*REPLIED, *FAILURES)


class BadRow(ValueError):
    """Internal: a line that parses as JSON but is not a prediction row (the message says why)."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_row(row) -> dict:
    """`row` if it has the shape `storm_vlm.eval.runner.predict_row` writes; BadRow otherwise."""
    if not isinstance(row, dict):
        raise BadRow(f"a JSON {type(row).__name__}, not an object")
    rid = row.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise BadRow(f"'id' must be a non-empty string, got {rid!r}")
    status = row.get("status")
    if status not in STATUSES:
        raise BadRow(f"'status' must be one of {', '.join(STATUSES)}, got {status!r}")
    if status in FAILURES:
        if not isinstance(row.get("error"), str):
            raise BadRow(f"a {status} row needs its 'error' text, got {row.get('error')!r}")
        if row.get("reply") is not None:
            raise BadRow(f"a {status} row has a 'reply'")
    elif not isinstance(row.get("reply"), str):
        raise BadRow(f"an {status} row needs the model's 'reply' text, got {row.get('reply')!r}")
    for key in ("latency_s", "prefill_s"):
        if key in row and not (_is_number(row[key]) and row[key] >= 0):
            raise BadRow(f"{key!r} must be a finite number >= 0, got {row[key]!r}")
    if "num_frames" in row and (not isinstance(row["num_frames"], int) or isinstance(row["num_frames"], bool)
                                or row["num_frames"] < 0):
        raise BadRow(f"'num_frames' must be an integer >= 0, got {row['num_frames']!r}")
    return row


def _parse(raw: bytes) -> dict:
    """One line -> row. ValueError (JSON, UTF-8, nesting) when it does not parse; BadRow when it
    parses but is not a row."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return check_row(obj)


def shard_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """The file this rank appends to: predictions.jsonl alone, or predictions.rank{r}.jsonl."""
    if world_size <= 1:
        return out_dir / "predictions.jsonl"
    return out_dir / f"predictions.rank{rank}.jsonl"


def all_prediction_files(out_dir: Path) -> list[Path]:
    files = [out_dir / "predictions.jsonl"] if (out_dir / "predictions.jsonl").exists() else []
    return files + sorted(out_dir.glob("predictions.rank*.jsonl"))


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> row for every complete line of `path` (a later line for the same id wins: a retried
    failure); {} if absent. StormError naming the file and line for a damaged or invalid row."""
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StormError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    complete = lines[:-1]  # the piece after the last newline is empty or a partial line
    for n, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            row = _parse(raw)
        except BadRow as exc:
            raise StormError(f"{path}, line {n}: not a valid prediction row ({exc}); "
                             "the file was edited or damaged — move it aside to start over") from None
        except ValueError:  # JSON, UTF-8 or nesting: the line does not parse
            if n == len(complete) and not lines[-1]:
                # a last line that was cut mid-write but still got a newline: drop it
                continue
            raise StormError(f"{path}, line {n}: not a prediction record ({raw[:80]!r}); "
                             "the file is damaged — move it aside to start over") from None
        rows[row["id"]] = row
    return rows


def read_all(out_dir: Path) -> dict[str, dict]:
    """Predictions from every file in `out_dir`: the merged file, then per-rank shards (which win),
    except that a reply is never replaced by a failure from another file. A question answered is
    never asked again, so its reply is the newest row; a failure beside it is an older attempt (a
    shard a killed multi-rank run left, whose failed question a rerun with another number of ranks
    answered in another file)."""
    rows: dict[str, dict] = {}
    for f in all_prediction_files(out_dir):
        for rid, row in read_predictions(f).items():
            if not (row["status"] in FAILURES and rid in rows and rows[rid]["status"] not in FAILURES):
                rows[rid] = row
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a partial (or unparsable) last line so the next append starts on a clean line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data:
        return
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    body = keep.rstrip(b"\n")
    last = body[body.rfind(b"\n") + 1:] if body else b""
    if last.strip():
        try:
            _parse(last)
        except BadRow:
            pass  # a whole line that is not a row: reading names it as an error, never silently cut
        except ValueError:
            keep = keep[: len(keep) - len(last) - 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())


class PredictionWriter:
    """Appends rows to a predictions file, each flushed and fsync'd."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(out_dir: Path, order: list[str]) -> Path:
    """Merge every predictions file in `out_dir` into predictions.jsonl (atomically, one row
    per id, in `order` first, then any others), then remove the per-rank shards."""
    rows = read_all(out_dir)
    known = set(order)
    ordered = [rows[i] for i in order if i in rows] + [r for i, r in rows.items() if i not in known]
    target = out_dir / "predictions.jsonl"
    atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for shard in out_dir.glob("predictions.rank*.jsonl"):
        shard.unlink()
    return target
