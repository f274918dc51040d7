"""Confidence intervals for the demo's accuracies and for the gaps between its rows.

The demo evaluates each table row with a few training seeds on one fixed set of held-out questions
(seeds crossed with questions), so a reported accuracy varies for two reasons: the seed (which model
came out of training) and the questions (which finite sample of the benchmark was drawn). The
interval covers both, as a Student-t interval whose standard error adds the two components:

    SE² = var(per-seed statistic) / n_seeds + Σ_t var_t(per-question mean over seeds) / (n_t · T²)

(variances with ddof = 1; T tasks, n_t questions in task t; the statistic is the mean over tasks of
the per-task accuracy, tasks weighted equally as in the table's "average" column). Its degrees of
freedom come from Welch–Satterthwaite, rounded down, and are 1 with two seeds (there the estimate
rests on a one-df variance and under-covers). With three seeds the seed term usually dominates and
df ≈ 2 (t = 4.30, not 1.96): a percentile bootstrap over three seeds, which can draw only 10 distinct
seed multisets, under-covers (~80 % when seeds dominate); this interval keeps 93–98 % over seed
spreads from none to much larger than the question noise (simulated in tests/test_demo_claims.py).
The SE counts the seed × question noise in both terms, which errs wide when seeds agree.

A variance that cannot be estimated (one seed, or a task with one question) leaves the interval
unbounded; every interval is clipped to what the quantity can take (accuracy 0..1, gap −1..1), so
a one-seed run reports the whole range. Nothing is random: the same tables give the same numbers.

`paired_gap` compares two rows evaluated on the same seeds and questions, on the per-(seed, question)
difference A − B: the question effects the rows share cancel, and the seed term is the spread of the
per-seed gaps. `verdict` turns the gap's interval into "reproduced" / "contradicted" /
"inconclusive" (a claim "A ≥ B" is judged by the same rule; there is no margin).

A *correctness table* is a dict {seed: {question_id: correct}} (correct: a bool or 0/1); every seed
must hold the same question ids. `tasks_of` maps question_id -> task name. Accuracies are fractions
in 0..1.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["accuracy_ci", "paired_gap", "t_quantile", "verdict"]


def verdict(low: float, high: float) -> str:
    """'reproduced' if the interval of the gap A − B lies above 0, 'contradicted' if below, else 'inconclusive'."""
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| ≤ t) = level for Student's T with `df` (≥ 1, integer) degrees of freedom.

    Bisection on θ = atan(t / √df) of the closed-form two-sided probability (Abramowitz & Stegun
    26.7.3–4), numpy only.
    """
    if not (0 < level < 1 and df >= 1):
        raise ValueError(f"t_quantile needs 0 < level < 1 and df >= 1, got level={level}, df={df}")
    df = int(df)
    k = np.arange(1, df // 2)
    # coefficients of cos^(2k) θ: 1·3···(2k−1) / 2·4···(2k) for even df, 2·4···2k / 3·5···(2k+1) for odd df
    coef = np.cumprod(np.r_[1.0, (2 * k - 1) / (2 * k) if df % 2 == 0 else 2 * k / (2 * k + 1)])

    def prob(theta: float) -> float:
        s, c = math.sin(theta), math.cos(theta)
        series = float(np.sum(coef * c ** (2 * np.arange(len(coef)))))
        if df % 2 == 0:
            return s * series
        return 2 / math.pi * (theta + (s * c * series if df > 1 else 0.0))

    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prob(mid) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def _listed(items) -> str:
    items = sorted(items, key=str)
    return ", ".join(map(repr, items[:5])) + (f" … ({len(items)} in all)" if len(items) > 5 else "")


def _matrix(table: dict, tasks_of: dict) -> tuple[list, list, np.ndarray]:
    """(seeds, question_ids, correct): `correct` is a (seeds, questions) float 0/1 matrix, both axes sorted."""
    seeds = sorted(table)
    qids = sorted(table[seeds[0]]) if seeds else []
    for s in seeds:
        if set(table[s]) != set(qids):
            missing, extra = set(qids) - set(table[s]), set(table[s]) - set(qids)
            raise ValueError(f"seed {s!r} differs from seed {seeds[0]!r} in question ids: "
                             f"missing [{_listed(missing)}], extra [{_listed(extra)}]")
        if bad := [q for q in qids if table[s][q] not in (0, 1)]:  # a NaN or None would pass as bool()
            raise ValueError(f"seed {s!r}: correctness must be true/false (or 1/0), not "
                             f"{table[s][bad[0]]!r} at [{_listed(bad)}]")
    if unknown := [q for q in qids if q not in tasks_of]:
        raise ValueError(f"questions without a task in tasks_of: [{_listed(unknown)}]")
    correct = np.array([[float(table[s][q]) for q in qids] for s in seeds]).reshape(len(seeds), len(qids))
    return seeds, qids, correct


def _groups(qids: list, tasks_of: dict, task: str | None) -> list[np.ndarray]:
    """Column indices of each task in scope: all tasks (sorted by name) when `task` is None, else just `task`."""
    names = sorted({tasks_of[q] for q in qids}) if task is None else [task]
    groups = [np.array([i for i, q in enumerate(qids) if tasks_of[q] == t], dtype=np.intp) for t in names]
    if task is not None and qids and not len(groups[0]):
        raise ValueError(f"no question of task {task!r} in the table")
    return [g for g in groups if len(g)]


def _per_seed(values: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The task-averaged statistic of each seed (row of `values`), shape (seeds,)."""
    return np.mean([values[:, g].mean(axis=1) for g in groups], axis=0)


def _t_interval(values: np.ndarray, groups: list[np.ndarray], level: float,
                bounds: tuple[float, float]) -> tuple[float, float, float]:
    """(mean, low, high) of the task-averaged mean of a (seeds, questions) matrix; see the module docstring."""
    if not values.size or not groups:
        return 0.0, 0.0, 0.0
    per_seed = _per_seed(values, groups)
    mean = float(per_seed.mean())
    n_seeds, n_tasks = len(per_seed), len(groups)
    if n_seeds < 2 or min(map(len, groups)) < 2:
        return mean, bounds[0], bounds[1]  # a variance component is unknown: nothing bounds the mean
    parts = [per_seed.var(ddof=1) / n_seeds]
    parts += [values[:, g].mean(axis=0).var(ddof=1) / (len(g) * n_tasks ** 2) for g in groups]
    dfs = [n_seeds - 1] + [len(g) - 1 for g in groups]
    total = sum(parts)
    if total == 0:
        return mean, mean, mean
    # Welch–Satterthwaite (>= n_seeds - 1); with two seeds the one-df seed variance is too unstable for it
    df = total ** 2 / sum(p ** 2 / d for p, d in zip(parts, dfs)) if n_seeds > 2 else 1
    half = t_quantile(level, max(1, math.floor(df))) * math.sqrt(total)
    return mean, max(bounds[0], mean - half), min(bounds[1], mean + half)


def accuracy_ci(table: dict, tasks_of: dict, task: str | None = None, *, level: float = 0.95) -> dict:
    """Mean accuracy of one row (of `task`, or the task average when None) with its t interval.

    Returns {"mean", "low", "high", "std_over_seeds" (population std), "per_seed" (list, sorted by
    seed), "n_seeds", "n_questions" (in scope)}. An empty table gives zeros; one seed gives the
    interval 0..1 (its seed-to-seed spread is unknown).
    """
    seeds, qids, correct = _matrix(table, tasks_of)
    groups = _groups(qids, tasks_of, task)
    mean, low, high = _t_interval(correct, groups, level, (0.0, 1.0))
    per_seed = [float(v) for v in _per_seed(correct, groups)] if groups else [0.0] * len(seeds)
    return {
        "mean": mean, "low": low, "high": high,
        "std_over_seeds": float(np.std(per_seed)) if per_seed else 0.0, "per_seed": per_seed,
        "n_seeds": len(seeds), "n_questions": int(sum(len(g) for g in groups)),
    }


def paired_gap(table_a: dict, table_b: dict, tasks_of: dict, task: str | None = None, *,
               level: float = 0.95) -> dict:
    """The gap A − B in accuracy with its paired t interval: {"gap", "low", "high", "verdict"}.

    Both rows must hold the same seeds and question ids (ValueError naming the difference otherwise).
    """
    if set(table_a) != set(table_b):
        raise ValueError(f"rows differ in seeds: only in A [{_listed(set(table_a) - set(table_b))}], "
                         f"only in B [{_listed(set(table_b) - set(table_a))}]")
    _, qids, correct_a = _matrix(table_a, tasks_of)
    _, qids_b, correct_b = _matrix(table_b, tasks_of)
    if qids != qids_b:
        raise ValueError(f"rows differ in question ids: only in A [{_listed(set(qids) - set(qids_b))}], "
                         f"only in B [{_listed(set(qids_b) - set(qids))}]")
    groups = _groups(qids, tasks_of, task)
    gap, low, high = _t_interval(correct_a - correct_b, groups, level, (-1.0, 1.0))
    return {"gap": gap, "low": low, "high": high, "verdict": verdict(low, high)}
