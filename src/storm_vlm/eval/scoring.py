"""Accuracy, counts and each benchmark's standard breakdowns, from records + predictions.

A prediction row (one line of predictions.jsonl) has ``status`` "answered" (a letter was
read), "unparsed" (the reply named no single option, or was empty — counted as
`empty_replies` too: counted wrong), "model_error" (the model raised on this question: counted
wrong) or "decode_error" (the video could not be read: counted separately). ``accuracy`` is over
the questions the model saw (answered + unparsed + model errors); ``accuracy_all`` also counts
decode failures as wrong. Breakdowns use the questions the model saw.

For the benchmarks whose headline is a mean over groups (MVBench's tasks, MLVU's question types),
``mean_over_<key>`` averages the groups with at least one question seen; a group whose every
question failed to decode (a video folder left unzipped) would silently drop out of it, so such
groups are named in a warning and in ``headline["groups_without_answers"]``, and
``mean_over_<key>_all`` averages every group, decode failures counted wrong (as ``accuracy_all``).

Nothing a row says about its own correctness is trusted: `score` recomputes status, pred,
pred_letter and correct from the row's stored `reply` and the record's answer (`judge`, the same
function the runner uses when it writes the row), so an edited `correct` flag or a stale reading
rule cannot change a number. Rows whose stored fields disagree are listed in `corrected_ids`;
rows whose id is not one of the records are not scored and are listed in `unknown_ids`.

Standard breakdowns (the groups lmms-eval reports for each task): VideoMME by duration, domain,
sub-category and task type; MVBench per task and
the mean over tasks (its headline); MLVU per question type and the mean over types
(M-Avg, its headline); LongVideoBench by duration group and question category; EgoSchema
the 500-question subset; synthetic by task.
"""

from __future__ import annotations

import logging
from typing import Iterable

from storm_vlm.choices import LETTERS, extract_choice
from storm_vlm.eval.predictions import FAILURES
from storm_vlm.eval.records import Record

log = logging.getLogger("storm_vlm.eval")
JUDGED = ("status", "pred", "pred_letter", "correct")

BREAKDOWNS: dict[str, tuple[str, ...]] = {
    "videomme": ("duration", "domain", "sub_category", "task_type"),
    "mvbench": ("task",),
    "mlvu": ("question_type",),
    "longvideobench": ("duration_group", "question_category"),
    "egoschema": (),
    "synthetic": ("task",),
}
MEAN_OVER = {"mvbench": "task", "mlvu": "question_type"}
HEADLINE_NAMES = {
    "videomme": "accuracy",
    "mvbench": "mean accuracy over tasks",
    "mlvu": "M-Avg (mean accuracy over question types)",
    "longvideobench": "accuracy",
    "egoschema": "subset accuracy (500 questions)",
    "synthetic": "accuracy",
}


def _acc(correct: int, count: int) -> float | None:
    return correct / count if count else None


def _group(rows: list[tuple[Record, dict]], key: str) -> dict:
    groups: dict[str, list[int]] = {}
    for rec, row in rows:
        value = rec.categories.get(key, "?")
        g = groups.setdefault(value, [0, 0])
        g[0] += bool(row.get("correct"))
        g[1] += 1
    return {v: {"correct": c, "count": n, "accuracy": _acc(c, n)} for v, (c, n) in groups.items()}


def _mean_accuracy(groups: dict) -> float | None:
    """The unweighted mean of the groups' accuracies (groups with no question left out), or None."""
    accs = [g["accuracy"] for g in groups.values() if g["accuracy"] is not None]
    return sum(accs) / len(accs) if accs else None


def judge(reply: str | None, record: Record, failure: str = "decode_error") -> dict:
    """status, pred, pred_letter and correct of a reply to `record`; a reply of None is the
    `failure` status (one of `FAILURES`: no reply was made)."""
    if reply is None:
        return {"status": failure, "pred": None, "pred_letter": None, "correct": False}
    pred = extract_choice(reply, record.options)
    return {"status": "answered" if pred is not None else "unparsed", "pred": pred,
            "pred_letter": None if pred is None else LETTERS[pred],
            "correct": pred is not None and pred == record.answer}


def rescore(records: Iterable[Record], predictions: dict[str, dict]) -> tuple[dict[str, dict], list[str], list[str]]:
    """(rows of `records` with the judged fields recomputed, ids whose stored fields disagreed,
    ids of rows that match no record)."""
    by_id = {r.id: r for r in records}
    out, corrected = {}, []
    for rid, row in predictions.items():
        record = by_id.get(rid)
        if record is None:
            continue
        status = row.get("status")
        fresh = judge(None, record, status) if status in FAILURES else judge(row.get("reply"), record)
        if any(row.get(k) != fresh[k] for k in JUDGED):
            corrected.append(rid)
        out[rid] = {**row, **fresh}
    unknown = [rid for rid in predictions if rid not in by_id]
    if corrected:
        log.warning("%d prediction rows stored a status/pred/correct that their reply does not give (e.g. %s); "
                    "scored from the reply", len(corrected), corrected[0])
    return out, corrected, unknown


def score(benchmark: str, records: Iterable[Record], predictions: dict[str, dict]) -> dict:
    """Overall accuracy, counts and breakdowns for `records` given `predictions` (id -> row as
    written by the runner: each is judged again from its `reply`, see the module docstring)."""
    records = list(records)
    predictions, corrected, unknown = rescore(records, predictions)
    done = [(r, predictions[r.id]) for r in records if r.id in predictions]
    seen = [(r, p) for r, p in done if p.get("status") != "decode_error"]
    if done and not seen:
        first = done[0][1]
        log.warning("%s: the video of every one of the %d questions failed to decode (the first, %s: %s), so no "
                    "accuracy can be given; check that the videos are where the annotations say", benchmark,
                    len(done), first["id"], first.get("error"))
    correct = sum(bool(p.get("correct")) for _, p in seen)
    counts = {
        "total": len(records),
        "predicted": len(done),
        "answered": sum(p.get("status") == "answered" for _, p in done),
        "unparsed": sum(p.get("status") == "unparsed" for _, p in done),
        # unparsed because the model ended its turn at once: an empty reply, said as such
        "empty_replies": sum(p.get("status") == "unparsed" and not (p.get("reply") or "").strip() for _, p in done),
        "decode_failures": sum(p.get("status") == "decode_error" for _, p in done),
        "model_failures": sum(p.get("status") == "model_error" for _, p in done),
        "missing": len(records) - len(done),
        "correct": correct,
    }
    out: dict = {
        "benchmark": benchmark,
        "accuracy": _acc(correct, len(seen)),
        "accuracy_all": _acc(correct, len(done)),
        "counts": counts,
        "breakdowns": {key: _group(seen, key) for key in BREAKDOWNS.get(benchmark, ())},
    }
    out["headline"] = {"name": HEADLINE_NAMES.get(benchmark, "accuracy"), "value": out["accuracy"]}
    if benchmark in MEAN_OVER:
        key = MEAN_OVER[benchmark]
        seen_groups, all_groups = out["breakdowns"][key], _group(done, key)
        out[f"mean_over_{key}"] = _mean_accuracy(seen_groups)
        out[f"mean_over_{key}_all"] = _mean_accuracy(all_groups)
        unseen = [g for g in all_groups if g not in seen_groups]
        if unseen:
            log.warning("%s: every question of %s %s failed to decode; %s covers only the other %d (%s counts "
                        "them wrong)", benchmark, key, ", ".join(map(repr, unseen)), f"mean_over_{key}",
                        len(seen_groups), f"mean_over_{key}_all")
        out["headline"].update(value=out[f"mean_over_{key}"], groups_without_answers=unseen)
    out["unparsed_ids"] = [r.id for r, p in done if p["status"] == "unparsed"][:100]
    out["decode_failure_ids"] = [r.id for r, p in done if p["status"] == "decode_error"][:100]
    out["model_failure_ids"] = [r.id for r, p in done if p["status"] == "model_error"][:100]
    out["corrected_ids"] = corrected[:100]
    out["unknown_ids"] = unknown[:100]
    for key in ("latency_s", "prefill_s"):
        values = [p[key] for _, p in seen if isinstance(p.get(key), (int, float))]
        if values:
            out[f"mean_{key}"] = sum(values) / len(values)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_table(results: dict) -> str:
    """A Markdown table of the headline, counts and breakdowns."""
    c = results["counts"]
    s = results.get("settings", {})
    lines = [f"## {results['benchmark']}", ""]
    if s:
        lines.append(f"model: {s.get('model')}  frames: {s.get('num_frames')}  fps: {s.get('fps')}  "
                     f"temporal sample stride: {s.get('temporal_sample_stride')}")
        lines.append("")
    lines += ["| metric | value |", "| --- | --- |"]
    headline = results["headline"]
    if headline["name"] != "accuracy":
        lines.append(f"| {headline['name']} | {_pct(headline['value'])} |")
    key = MEAN_OVER.get(results["benchmark"])
    if key and f"mean_over_{key}_all" in results:
        lines.append(f"| {headline['name']} (decode failures as wrong) | {_pct(results[f'mean_over_{key}_all'])} |")
    if headline.get("groups_without_answers"):
        lines.append(f"| {key} with every video undecodable (left out of the mean) | "
                     f"{', '.join(headline['groups_without_answers'])} |")
    lines += [f"| accuracy (questions seen) | {_pct(results['accuracy'])} |",
              f"| accuracy (decode failures as wrong) | {_pct(results['accuracy_all'])} |"]
    for k in ("total", "answered", "unparsed", "empty_replies", "model_failures", "decode_failures", "missing"):
        if k in c:
            lines.append(f"| {k.replace('_', ' ')} | {c[k]} |")
    if "mean_latency_s" in results:
        lines.append(f"| mean latency per question (s) | {results['mean_latency_s']:.3f} |")
    if "mean_prefill_s" in results:
        lines.append(f"| mean prefill latency (s) | {results['mean_prefill_s']:.3f} |")
    for key, groups in results["breakdowns"].items():
        if not groups:  # no question seen
            continue
        lines += ["", f"| {key} | accuracy | correct / count |", "| --- | --- | --- |"]
        for value, g in groups.items():
            lines.append(f"| {value} | {_pct(g['accuracy'])} | {g['correct']} / {g['count']} |")
    return "\n".join(lines) + "\n"
