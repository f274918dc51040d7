"""The resumable evaluation loop, independent of what answers the questions.

``run_predictions`` walks a rank's shard of records, skips ids already in the output
folder, loads frames, asks a `Predictor`, reads the reply with `extract_choice`, and
appends one row per question to predictions.jsonl (fsync'd). A video that fails to decode
becomes a row with status "decode_error", a question the predictor raises on one with status
"model_error" (a long video past the model's memory, a prompt past its context), and the run
goes on; only a model that fails on every one of the run's first `FAILED_START` questions, with
no reply in the folder yet, stops it, as that is the model or its settings, not the questions.
With ``batch_size`` > 1 and a predictor that has ``predict_batch`` (the model-backed one does),
questions are answered that many at a time in one padded batch; a batch that raises is answered
again one question at a time, so one bad question fails alone. ``finalize`` scores every
row and writes results.json (atomically), results.md and the printed table.

Ranks (torchrun's RANK / WORLD_SIZE) take disjoint shards, whole videos dealt round-robin
(`shard`: a video's questions stay together, so its frames and the model's work on it are shared),
each appending to its own predictions.rank{r}.jsonl; after a barrier rank 0 merges them
into predictions.jsonl. A rerun — with any number of ranks — skips every id already in
any of these files, except model errors, which are tried again (decode failures only when
asked to retry them: they are the file's).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from storm_vlm.errors import StormError
from storm_vlm.eval import predictions as P
from storm_vlm.eval.frames import load_record_frames
from storm_vlm.eval.records import Record
from storm_vlm.eval.scoring import format_table, judge, score
from storm_vlm.utils import atomic_write_text

log = logging.getLogger("storm_vlm.eval")

# Settings that must match for a rerun to add to an existing output folder. "precision": the weights',
# LLM linear layers' and autocast dtypes (model_predictor.precision_settings): bf16 and fp32 answers differ.
# "data_root": the benchmark's folder (None in-process): two releases of one benchmark (MLVU's dev and test)
# number their questions alike, so a reply to one must not be scored against the other's answer.
IDENTITY_KEYS = ("benchmark", "model", "num_frames", "fps", "temporal_sample_stride", "max_new_tokens", "prompt",
                 "precision", "data_root")
FAILED_START = 5  # model errors, before any answer of a run, that stop it


@runtime_checkable
class Predictor(Protocol):
    """Answers one question: given the record and its frames (T, H, W, 3) uint8, the reply text."""

    def predict(self, record: Record, frames: np.ndarray) -> str: ...


FrameLoader = Callable[[Record], np.ndarray]


def shard(records: Sequence[Record], rank: int, world_size: int) -> list[Record]:
    """This rank's disjoint share, a video's questions together: the videos (in order of first
    appearance) dealt round-robin, each with all its questions, in order. Asked one after the
    other, the questions of one video share its decoded frames (`last_clip_memo`) and the model's
    work on it (`storm_vlm.inference.Predictor`'s `reuse_prefix`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise StormError(f"rank {rank} is not within world size {world_size}")
    by_video: dict[str, list[Record]] = {}
    for record in records:
        by_video.setdefault(record.video, []).append(record)
    return [r for group in list(by_video.values())[rank::world_size] for r in group]


def last_clip_memo(frame_loader: FrameLoader) -> FrameLoader:
    """`frame_loader` that hands a record the previous record's frames when both read the same
    clip (video, start, end): the questions of one video decode it once (and a video that fails
    to decode fails them all at once, with its error). Holds one clip."""
    last: list = [None, None]  # (clip, frames or the decode error)

    def load(record: Record) -> np.ndarray:
        clip = (record.video, record.start, record.end, record.frames_fps)
        if last[0] != clip:
            last[:] = [None, None]  # the old frames are freed before the new ones are decoded
            try:
                last[:] = [clip, frame_loader(record)]
            except Exception as exc:
                last[:] = [clip, exc]
        if isinstance(last[1], Exception):
            raise last[1].with_traceback(None)  # (each question's own traceback, not all of them)
        return last[1]
    return load


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_settings(out_dir: Path, settings: dict, write: bool) -> None:
    """Refuse to mix predictions made with different settings in one output folder.

    run_config.json must be a JSON object (a key it lacks reads as null); anything else (a list,
    garbage, a file cut short), or predictions without it, is an error naming the file: the
    predictions cannot be tied to settings, so they are not added to."""
    path = out_dir / "run_config.json"
    identity = {k: settings.get(k) for k in IDENTITY_KEYS}
    if path.exists():
        try:
            old = json.loads(path.read_bytes())
        except OSError as exc:
            raise StormError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8 or nesting
            raise StormError(f"{path}: not valid JSON ({exc}); move the folder aside or use a new --output") from None
        if not isinstance(old, dict):
            raise StormError(f"{path}: expected a JSON object of run settings, got a {type(old).__name__}; "
                             "move the folder aside or use a new --output")
        diff = {k: (old.get(k), identity[k]) for k in IDENTITY_KEYS if old.get(k) != identity[k]}
        if diff:
            desc = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise StormError(f"{out_dir} holds predictions made with other settings ({desc}); "
                             "use a new --output folder")
    elif (pred := out_dir / "predictions.jsonl").exists() and pred.stat().st_size:
        # (not the per-rank files: under torchrun another rank may write its own before rank 0 gets here)
        raise StormError(f"{pred} holds predictions but there is no {path.name} naming the settings they were "
                         "made with; use a new --output folder")
    elif write:
        atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


def check_unique_ids(records: Sequence[Record]) -> None:
    """StormError when two records share an id: predictions.jsonl holds one row per id, so one
    question's reply would be scored twice and the other's lost."""
    first: dict[str, int] = {}
    for i, record in enumerate(records):
        if first.setdefault(record.id, i) != i:
            raise StormError(f"records {first[record.id]} and {i} share the id {record.id!r}; "
                             "every question needs its own id")


def _failed(row: dict, status: str, exc: Exception) -> dict:
    log.warning("%s for %s: %s", status.replace("_", " "), row["id"], exc)
    row.update(status=status, pred=None, pred_letter=None, correct=False, reply=None,
               error=f"{type(exc).__name__}: {exc}")
    return row


def _load(record: Record, frame_loader: FrameLoader, row: dict) -> np.ndarray | None:
    """The record's frames, or None after recording the decode failure in `row`."""
    try:
        return frame_loader(record)
    except Exception as exc:  # any failure to read the video is recorded and the run goes on
        _failed(row, "decode_error", exc)
        return None


def _answered(row: dict, record: Record, reply, frames: np.ndarray, latency: float) -> dict:
    if not isinstance(reply, str):
        raise TypeError(f"the predictor returned {type(reply).__name__}, not the reply text")
    verdict = judge(reply, record)
    if verdict["pred"] is None:
        log.warning("unparsed reply for %s: %r", record.id, reply)
    row.update(**verdict, reply=reply, error=None, num_frames=int(frames.shape[0]), latency_s=round(latency, 4))
    return row


def _blank_row(record: Record) -> dict:
    return {"id": record.id, "answer": record.answer, "answer_letter": record.answer_letter,
            "categories": record.categories}


def _predict(row: dict, record: Record, frames: np.ndarray, predictor: Predictor) -> dict:
    t0 = time.perf_counter()
    try:
        reply = predictor.predict(record, frames)
    except Exception as exc:  # this question's failure is recorded and the run goes on
        return _failed(row, "model_error", exc)
    _answered(row, record, reply, frames, time.perf_counter() - t0)
    timing = getattr(predictor, "last_timing", None)
    if isinstance(timing, dict) and "prefill_s" in timing:
        row["prefill_s"] = timing["prefill_s"]
    return row


def predict_row(record: Record, predictor: Predictor, frame_loader: FrameLoader) -> dict:
    """One predictions.jsonl row for `record` (decode and model failures become a row, not an
    exception)."""
    row = _blank_row(record)
    frames = _load(record, frame_loader, row)
    return row if frames is None else _predict(row, record, frames, predictor)


def predict_rows(records: Sequence[Record], predictor, frame_loader: FrameLoader) -> list[dict]:
    """predictions.jsonl rows for `records`, answered as one batch by `predictor.predict_batch`
    (if it raises, one question at a time by `predictor.predict`); latency_s is the batch's wall
    time shared evenly among its questions."""
    rows = [_blank_row(r) for r in records]
    loaded = [(row, r, f) for row, r in zip(rows, records)
              if (f := _load(r, frame_loader, row)) is not None]
    if not loaded:
        return rows
    t0 = time.perf_counter()
    try:
        replies = predictor.predict_batch([r for _, r, _ in loaded], [f for _, _, f in loaded])
    except Exception as exc:
        log.warning("a batch of %d questions failed (%s: %s); answering them one at a time",
                    len(loaded), type(exc).__name__, exc)
        for row, record, frames in loaded:
            _predict(row, record, frames, predictor)
        return rows
    latency = (time.perf_counter() - t0) / len(loaded)
    for (row, record, frames), reply in zip(loaded, replies, strict=True):
        _answered(row, record, reply, frames, latency)
    return rows


def run_predictions(records: Sequence[Record], predictor: Predictor, out_dir: str | Path, *,
                    frame_loader: FrameLoader, rank: int = 0, world_size: int = 1,
                    progress: bool = True, retry_failed: bool = False, batch_size: int = 1) -> int:
    """Predict this rank's shard of `records` not yet answered in `out_dir` (model errors are tried
    again; decode failures too with `retry_failed`), `batch_size` at a time; returns how many rows
    were added. StormError when the model fails on each of the run's first `FAILED_START`
    questions and no reply is in `out_dir` yet."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = shard(records, rank, world_size)
    retry = ("model_error", "decode_error") if retry_failed else ("model_error",)
    existing = P.read_all(out_dir)
    done = {rid for rid, row in existing.items() if row["status"] not in retry}
    todo = [r for r in mine if r.id not in done]
    if len(mine) - len(todo):
        log.info("rank %d: %d of %d questions already done in %s", rank, len(mine) - len(todo), len(mine), out_dir)
    # replies already in the folder (made with these settings: check_settings) show that the model
    # works, so a rerun left with only the questions it failed on is not stopped for failing again
    model_answered = sum(row["status"] in P.REPLIED for row in existing.values())
    added = model_failed = 0
    frame_loader = last_clip_memo(frame_loader)
    with P.PredictionWriter(P.shard_path(out_dir, rank, world_size)) as writer:
        step = batch_size if batch_size > 1 and hasattr(predictor, "predict_batch") else 1
        with tqdm(desc=f"eval{'' if world_size == 1 else f' rank {rank}'}", unit="q", disable=not progress,
                  initial=len(mine) - len(todo), total=len(mine)) as bar:
            for i in range(0, len(todo), step):
                chunk = todo[i:i + step]
                rows = predict_rows(chunk, predictor, frame_loader) if step > 1 else \
                    [predict_row(chunk[0], predictor, frame_loader)]
                for row in rows:
                    writer.write(row)
                added += len(rows)
                failures = [row["error"] for row in rows if row["status"] == "model_error"]
                model_failed += len(failures)
                model_answered += sum(row["status"] in P.REPLIED for row in rows)
                bar.update(len(chunk))
                if not model_answered and model_failed >= FAILED_START:
                    raise StormError(f"the model failed on each of the first {model_failed} questions it saw "
                                     f"(the last: {failures[-1]}); fix the model or its settings and run "
                                     "again (failed questions are tried again)")
    return added


def finalize(benchmark: str, records: Sequence[Record], out_dir: str | Path, settings: dict,
             print_table: bool = True) -> dict:
    """Merge any per-rank files, score, and write results.json (atomic) and results.md."""
    out_dir = Path(out_dir)
    P.merge(out_dir, [r.id for r in records])
    rows = P.read_predictions(out_dir / "predictions.jsonl")
    results = score(benchmark, records, rows)
    results["settings"] = settings
    table = format_table(results)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "results.md", table)
    if print_table:
        print(table)
    return results


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def evaluate_with_predictor(predictor: Predictor, records: Sequence[Record], output_dir: str | Path, *,
                            benchmark: str | None = None, settings: dict | None = None,
                            num_frames: int = 32, fps: float | None = None, limit: int | None = None,
                            frame_loader: FrameLoader | None = None, rank: int | None = None,
                            world_size: int | None = None, progress: bool = True,
                            print_table: bool = True, retry_failed: bool = False,
                            batch_size: int = 1) -> dict | None:
    """Run and score `records` with any predictor. Returns results on rank 0, None elsewhere."""
    records = list(records)
    if not records:
        raise StormError("no records to evaluate")
    check_unique_ids(records)
    benchmark = benchmark or records[0].benchmark
    if limit is not None:
        records = records[: max(0, int(limit))]
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    settings = dict(settings or {})
    settings.setdefault("benchmark", benchmark)
    settings.setdefault("num_frames", num_frames)
    settings.setdefault("fps", fps)
    settings["limit"] = limit
    settings["num_records"] = len(records)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, settings, write=rank == 0)
    loader = frame_loader or (lambda r: load_record_frames(r, num_frames, fps))
    run_predictions(records, predictor, out_dir, frame_loader=loader, rank=rank, world_size=world_size,
                    progress=progress, retry_failed=retry_failed, batch_size=batch_size)
    _barrier()
    if rank != 0:
        return None
    return finalize(benchmark, records, out_dir, settings, print_table=print_table)
