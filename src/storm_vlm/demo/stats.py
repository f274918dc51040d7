"""Confidence intervals for the demo's accuracies and for the gaps between its rows.

The demo evaluates each table row with a few training seeds on one fixed set of held-out questions,
so a reported accuracy varies for two reasons: the seed (which model came out of training) and the
questions (which finite sample of the benchmark was drawn). A mean ± std over seeds ignores the
second; this module accounts for both with a two-stage bootstrap, in pure numpy:

* each replicate resamples the seeds with replacement, then the questions with replacement within
  each task, the same question resample for every seed (a question stays paired across seeds);
* the statistic is the accuracy of one task, or the task average (mean over tasks of the per-task
  accuracy, tasks weighted equally, as in the table's "average" column);
* the interval is the percentile interval of the replicates.

`paired_gap` compares two rows evaluated on the same seeds and questions: each replicate applies one
seed resample and one question resample to both rows, so the noise the rows share cancels in the
gap A − B. `verdict` turns the gap's interval into "reproduced" / "contradicted" / "inconclusive"
(a claim "A ≥ B" is judged by the same rule; there is no margin).

A *correctness table* is a dict {seed: {question_id: correct}}; every seed must hold the same
question ids. `tasks_of` maps question_id -> task name. Accuracies are fractions in 0..1.
Everything is deterministic for a given `seed` (numpy's default_rng).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "paired_gap", "verdict"]


def verdict(low: float, high: float) -> str:
    """'reproduced' if the interval of the gap A − B lies above 0, 'contradicted' if below, else 'inconclusive'."""
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def _listed(items) -> str:
    items = sorted(items, key=str)
    return ", ".join(map(repr, items[:5])) + (f" … ({len(items)} in all)" if len(items) > 5 else "")


def _matrix(table: dict, tasks_of: dict) -> tuple[list, list, np.ndarray]:
    """(seeds, question_ids, correct): `correct` is a (seeds, questions) bool matrix, both axes sorted."""
    seeds = sorted(table)
    qids = sorted(table[seeds[0]]) if seeds else []
    for s in seeds:
        if set(table[s]) != set(qids):
            missing, extra = set(qids) - set(table[s]), set(table[s]) - set(qids)
            raise ValueError(f"seed {s!r} differs from seed {seeds[0]!r} in question ids: "
                             f"missing [{_listed(missing)}], extra [{_listed(extra)}]")
    if unknown := [q for q in qids if q not in tasks_of]:
        raise ValueError(f"questions without a task in tasks_of: [{_listed(unknown)}]")
    correct = np.array([[bool(table[s][q]) for q in qids] for s in seeds], dtype=bool).reshape(len(seeds), len(qids))
    return seeds, qids, correct


def _groups(qids: list, tasks_of: dict, task: str | None) -> list[np.ndarray]:
    """Column indices of each task in scope: all tasks (sorted by name) when `task` is None, else just `task`."""
    names = sorted({tasks_of[q] for q in qids}) if task is None else [task]
    groups = [np.array([i for i, q in enumerate(qids) if tasks_of[q] == t], dtype=np.intp) for t in names]
    if task is not None and qids and not len(groups[0]):
        raise ValueError(f"no question of task {task!r} in the table")
    return [g for g in groups if len(g)]


def _statistic(correct: np.ndarray, groups: list[np.ndarray]) -> float:
    """Task-averaged accuracy of a (seeds, questions) matrix; 0.0 when it is empty."""
    if not correct.size or not groups:
        return 0.0
    return float(np.mean([correct[:, g].mean() for g in groups]))


def _draws(n_seeds: int, groups: list[np.ndarray], reps: int, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """One bootstrap draw per replicate: seed indices (reps, n_seeds) and, per task, question indices (reps, n_task)."""
    seed_idx = rng.integers(0, n_seeds, size=(reps, n_seeds))
    return seed_idx, [g[rng.integers(0, len(g), size=(reps, len(g)))] for g in groups]


def _replicates(correct: np.ndarray, seed_idx: np.ndarray, question_idx: list[np.ndarray]) -> np.ndarray:
    """The statistic of every replicate, shape (reps,)."""
    reps = len(seed_idx)
    if not correct.size or not question_idx:
        return np.zeros(reps)
    rows = np.arange(reps)[:, None]
    per_task = []
    for idx in question_idx:
        # (seeds, reps): each seed on each question resample (count_nonzero is ~10x faster than a bool mean)
        acc = np.stack([np.count_nonzero(row[idx], axis=1) for row in correct]) / idx.shape[1]
        per_task.append(acc.T[rows, seed_idx].mean(axis=1))  # (reps,): averaged over the resampled seeds
    return np.mean(per_task, axis=0)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(table: dict, tasks_of: dict, task: str | None = None, *, reps: int = 2000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Mean accuracy of one row (of `task`, or the task average when None) with its bootstrap interval.

    Returns {"mean", "low", "high", "std_over_seeds" (population std), "per_seed" (list, sorted by
    seed), "n_seeds", "n_questions" (in scope)}. An empty table gives zeros; one seed gives an
    interval from the questions alone.
    """
    seeds, qids, correct = _matrix(table, tasks_of)
    groups = _groups(qids, tasks_of, task)
    per_seed = [_statistic(correct[i:i + 1], groups) for i in range(len(seeds))]
    seed_idx, question_idx = _draws(len(seeds), groups, reps, np.random.default_rng(seed))
    low, high = _interval(_replicates(correct, seed_idx, question_idx), level)
    return {
        "mean": _statistic(correct, groups), "low": low, "high": high,
        "std_over_seeds": float(np.std(per_seed)) if per_seed else 0.0, "per_seed": per_seed,
        "n_seeds": len(seeds), "n_questions": int(sum(len(g) for g in groups)),
    }


def paired_gap(table_a: dict, table_b: dict, tasks_of: dict, task: str | None = None, *, reps: int = 2000,
               level: float = 0.95, seed: int = 0) -> dict:
    """The gap A − B in accuracy with its paired bootstrap interval: {"gap", "low", "high", "verdict"}.

    Both rows must hold the same seeds and question ids (ValueError naming the difference otherwise).
    """
    if set(table_a) != set(table_b):
        raise ValueError(f"rows differ in seeds: only in A [{_listed(set(table_a) - set(table_b))}], "
                         f"only in B [{_listed(set(table_b) - set(table_a))}]")
    seeds, qids, correct_a = _matrix(table_a, tasks_of)
    _, qids_b, correct_b = _matrix(table_b, tasks_of)
    if qids != qids_b:
        raise ValueError(f"rows differ in question ids: only in A [{_listed(set(qids) - set(qids_b))}], "
                         f"only in B [{_listed(set(qids_b) - set(qids))}]")
    groups = _groups(qids, tasks_of, task)
    seed_idx, question_idx = _draws(len(seeds), groups, reps, np.random.default_rng(seed))
    gaps = _replicates(correct_a, seed_idx, question_idx) - _replicates(correct_b, seed_idx, question_idx)
    low, high = _interval(gaps, level)
    return {"gap": _statistic(correct_a, groups) - _statistic(correct_b, groups), "low": low, "high": high,
            "verdict": verdict(low, high)}
