"""storm_vlm.demo.stats: t intervals over seeds and questions, and paired gaps, on hand-made correctness tables."""

import math
import time

import numpy as np
import pytest

from storm_vlm.demo.stats import accuracy_ci, paired_gap, t_quantile, verdict


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
    assert out["low"] == out["high"] == 0.0  # paired: the per-(seed, question) differences are all 0
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
    # three seeds with the same answers: no seed-to-seed spread, so the interval is the questions' alone
    p, n = 0.7, 1000
    one = make_row([p], n, shuffle_seed=3)[0]
    row = {s: one for s in range(3)}
    out = accuracy_ci(row, tasks_for(row))
    assert out["mean"] == pytest.approx(p) and out["low"] < p < out["high"]
    binomial = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert out["high"] - out["low"] == pytest.approx(binomial, rel=0.05)
    assert (out["n_seeds"], out["n_questions"]) == (3, n) and out["std_over_seeds"] == pytest.approx(0, abs=1e-12)


def test_three_seeds_use_the_t_quantile_of_their_spread():
    # every question answered by exactly one of the three seeds (20, 30, 50 questions): each question's
    # mean over seeds is 1/3, so only the seeds vary: gaps 0.2, 0.3, 0.5, mean 1/3, t with 2 df
    a = {s: {f"t{i}": lo <= i < hi for i in range(100)} for s, (lo, hi) in enumerate([(0, 20), (20, 50), (50, 100)])}
    b = {s: {f"t{i}": False for i in range(100)} for s in range(3)}
    out = paired_gap(a, b, tasks_for(a))
    half = 4.302653 * np.std([0.2, 0.3, 0.5], ddof=1) / math.sqrt(3)
    assert (out["gap"], out["low"], out["high"]) == pytest.approx((1 / 3, 1 / 3 - half, 1 / 3 + half))
    assert out["verdict"] == "inconclusive"  # +33 points, yet three seeds this far apart do not settle it


def test_t_quantile_matches_tables():
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(0.90, 7) == pytest.approx(1.8946, abs=1e-4)


def test_disagreeing_seeds_widen_the_ci():  # (e)
    spread, agree = make_row([0.3, 0.5, 0.9], 500, shuffle_seed=4), make_row([0.57, 0.56, 0.57], 500, shuffle_seed=4)
    wide, narrow = accuracy_ci(spread, tasks_for(spread)), accuracy_ci(agree, tasks_for(agree))
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
        accuracy_ci(broken, tasks_for(a))


def test_task_average_weights_tasks_equally():  # (g)
    big, small = make_row([0.3, 0.3], 300, task="big"), make_row([0.9, 0.7], 100, task="small")
    row = {s: {**big[s], **small[s]} for s in big}
    tasks = tasks_for(row)
    out = accuracy_ci(row, tasks)
    # per seed: (0.3 + 0.9) / 2 = 0.6 and (0.3 + 0.7) / 2 = 0.5; pooled over questions would be 0.45 / 0.4
    assert out["per_seed"] == pytest.approx([0.6, 0.5])
    assert out["mean"] == pytest.approx(0.55)
    assert out["std_over_seeds"] == pytest.approx(0.05)
    assert out["n_questions"] == 400
    assert accuracy_ci(row, tasks, task="small")["mean"] == pytest.approx(0.8)
    assert accuracy_ci(row, tasks, task="small")["n_questions"] == 100
    with pytest.raises(ValueError, match="nope"):
        accuracy_ci(row, tasks, task="nope")


def test_empty_and_single_seed_tables_give_no_nans():
    for out in (accuracy_ci({}, {}), accuracy_ci({0: {}}, {}), paired_gap({}, {}, {})):
        assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
    assert accuracy_ci({}, {})["mean"] == 0.0


def test_one_seed_says_nothing_about_seed_to_seed_spread():
    """One trained model per row: a 50-point gap may be that seed's luck, so the interval is the whole range."""
    one = make_row([0.5], 50, shuffle_seed=1)
    out = accuracy_ci(one, tasks_for(one))
    assert (out["low"], out["high"], out["per_seed"]) == (0.0, 1.0, [0.5])
    good, bad = make_row([0.95], 400, shuffle_seed=1), make_row([0.45], 400, shuffle_seed=2)
    gap = paired_gap(good, bad, tasks_for(good))
    assert gap["gap"] == pytest.approx(0.5)
    assert (gap["low"], gap["high"], gap["verdict"]) == (-1.0, 1.0, "inconclusive")


def test_non_boolean_correctness_is_refused():
    row = make_row([0.5, 0.5], 10)
    row[1]["t3"] = float("nan")  # bool(nan) is True: it would count as a correct answer
    with pytest.raises(ValueError, match=r"seed 1: correctness must be true/false.*nan.*'t3'"):
        accuracy_ci(row, tasks_for(row))


def test_fast_enough():
    a, b = make_row([0.7, 0.75, 0.8], 1500, shuffle_seed=1), make_row([0.6, 0.65, 0.7], 1500, shuffle_seed=2)
    tasks = tasks_for(a)
    start = time.perf_counter()
    paired_gap(a, b, tasks)
    assert time.perf_counter() - start < 1.0
