"""storm_vlm.demo.stats: two-stage bootstrap intervals and paired gaps on hand-made correctness tables."""

import math
import time

import numpy as np
import pytest

from storm_vlm.demo.stats import bootstrap_ci, paired_gap, verdict


def make_row(accs, n, task="t", offset=0, shuffle_seed=None):
    """{seed: {qid: bool}} with exactly round(acc * n) correct questions per seed (shuffled if asked)."""
    rng = np.random.default_rng(shuffle_seed)
    row = {}
    for s, acc in enumerate(accs):
        right = np.arange(n) < round(acc * n)
        if shuffle_seed is not None:
            rng.shuffle(right)
        row[s] = {f"{task}{offset + i}": bool(r) for i, r in enumerate(right)}
    return row


def tasks_for(*rows):
    return {q: q.rstrip("0123456789") for row in rows for qs in row.values() for q in qs}


def test_verdict_rule():
    assert verdict(0.01, 0.2) == "reproduced"
    assert verdict(-0.2, -0.01) == "contradicted"
    assert verdict(-0.1, 0.1) == verdict(0.0, 0.1) == verdict(0.0, 0.0) == "inconclusive"


def test_identical_rows_give_zero_gap():  # (a)
    row = make_row([0.6, 0.7, 0.65], 400, shuffle_seed=1)
    out = paired_gap(row, row, tasks_for(row))
    assert out["gap"] == 0.0
    assert out["low"] <= 0.0 <= out["high"] and abs(out["low"] + out["high"]) < 1e-12
    assert out["low"] == out["high"] == 0.0  # paired: every replicate applies the same draw to both rows
    assert out["verdict"] == "inconclusive"


def test_clear_gap_is_reproduced_and_reverse_contradicted():  # (b), (c)
    a, b = make_row([0.9] * 3, 600, shuffle_seed=1), make_row([0.5] * 3, 600, shuffle_seed=2)
    tasks = tasks_for(a)
    out = paired_gap(a, b, tasks)
    assert out["verdict"] == "reproduced"
    assert out["gap"] == pytest.approx(0.40)
    assert 0.02 < out["high"] - out["low"] < 0.2
    rev = paired_gap(b, a, tasks)
    assert rev["verdict"] == "contradicted"
    assert rev["gap"] == pytest.approx(-0.40)


def test_ci_matches_binomial_width():  # (d)
    p, n = 0.7, 1000
    row = make_row([p], n, shuffle_seed=3)
    out = bootstrap_ci(row, tasks_for(row))
    assert out["mean"] == pytest.approx(p) and out["low"] < p < out["high"]
    binomial = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert out["high"] - out["low"] == pytest.approx(binomial, rel=0.3)
    assert (out["n_seeds"], out["n_questions"], out["std_over_seeds"]) == (1, n, 0.0)


def test_disagreeing_seeds_widen_the_ci():  # (e)
    spread, agree = make_row([0.3, 0.5, 0.9], 500, shuffle_seed=4), make_row([0.57, 0.56, 0.57], 500, shuffle_seed=4)
    wide, narrow = bootstrap_ci(spread, tasks_for(spread)), bootstrap_ci(agree, tasks_for(agree))
    assert wide["n_questions"] == narrow["n_questions"]
    assert wide["std_over_seeds"] > 5 * narrow["std_over_seeds"]
    assert wide["high"] - wide["low"] > 3 * (narrow["high"] - narrow["low"])


def test_mismatched_rows_raise_naming_the_difference():  # (f)
    a = make_row([0.5, 0.5], 10)
    b = make_row([0.5, 0.5], 10, offset=1)  # t1..t10 vs t0..t9
    with pytest.raises(ValueError, match=r"question ids.*'t0'.*'t10'"):
        paired_gap(a, b, tasks_for(a, b))
    c = make_row([0.5, 0.5, 0.5], 10)
    with pytest.raises(ValueError, match=r"seeds.*only in B \[2\]"):
        paired_gap(a, c, tasks_for(a))
    broken = {0: dict(a[0]), 1: {q: v for q, v in a[1].items() if q != "t3"}}
    with pytest.raises(ValueError, match=r"seed 1.*missing \['t3'\]"):
        bootstrap_ci(broken, tasks_for(a))


def test_task_average_weights_tasks_equally():  # (g)
    big, small = make_row([0.3, 0.3], 300, task="big"), make_row([0.9, 0.7], 100, task="small")
    row = {s: {**big[s], **small[s]} for s in big}
    tasks = tasks_for(row)
    out = bootstrap_ci(row, tasks)
    # per seed: (0.3 + 0.9) / 2 = 0.6 and (0.3 + 0.7) / 2 = 0.5; pooled over questions would be 0.45 / 0.4
    assert out["per_seed"] == pytest.approx([0.6, 0.5])
    assert out["mean"] == pytest.approx(0.55)
    assert out["std_over_seeds"] == pytest.approx(0.05)
    assert out["n_questions"] == 400
    assert bootstrap_ci(row, tasks, task="small")["mean"] == pytest.approx(0.8)
    assert bootstrap_ci(row, tasks, task="small")["n_questions"] == 100
    with pytest.raises(ValueError, match="nope"):
        bootstrap_ci(row, tasks, task="nope")


def test_deterministic_for_a_fixed_seed():  # (h)
    a, b = make_row([0.6, 0.7, 0.8], 300, shuffle_seed=5), make_row([0.55, 0.6, 0.7], 300, shuffle_seed=6)
    tasks = tasks_for(a)
    assert bootstrap_ci(a, tasks, seed=7) == bootstrap_ci(a, tasks, seed=7)
    assert paired_gap(a, b, tasks, seed=7) == paired_gap(a, b, tasks, seed=7)
    assert bootstrap_ci(a, tasks, seed=7)["low"] != bootstrap_ci(a, tasks, seed=8)["low"]


def test_empty_and_single_seed_tables_give_no_nans():
    for out in (bootstrap_ci({}, {}), bootstrap_ci({0: {}}, {}), paired_gap({}, {}, {})):
        assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
    assert bootstrap_ci({}, {})["mean"] == 0.0
    one = make_row([0.5], 50, shuffle_seed=1)
    out = bootstrap_ci(one, tasks_for(one))
    assert out["low"] < 0.5 < out["high"] and out["per_seed"] == [0.5]


def test_fast_enough():
    a, b = make_row([0.7, 0.75, 0.8], 1500, shuffle_seed=1), make_row([0.6, 0.65, 0.7], 1500, shuffle_seed=2)
    tasks = tasks_for(a)
    start = time.perf_counter()
    paired_gap(a, b, tasks, reps=2000)
    assert time.perf_counter() - start < 1.0
