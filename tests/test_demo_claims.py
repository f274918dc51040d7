"""Do the demo's claim intervals keep their stated 95 %? Simulated rows with a known true gap.

The demo trains 3 seeds per row and evaluates them on one fixed set of questions; seed-to-seed
variation is usually larger than the question noise. Each simulation draws, per row and seed, a
seed effect on the accuracy, and per question a difficulty both rows share, then counts how often
`paired_gap`'s interval holds the true gap and how often a zero gap gets a decisive verdict.
"""

import numpy as np

from storm_vlm.demo.stats import accuracy_ci, paired_gap

TASKS = ("a", "b")
N_PER_TASK = 200
TASKS_OF = {f"{t}{i}": t for t in TASKS for i in range(N_PER_TASK)}


def simulate(rng, gap: float, seed_sd: float, n_seeds: int = 3, base: float = 0.55) -> tuple[dict, dict]:
    """Two correctness tables; row A's accuracy is row B's + `gap` in expectation over seeds and questions."""
    difficulty = rng.uniform(-0.2, 0.2, len(TASKS_OF))  # shared by both rows: the pairing
    rows = []
    for shift in (gap, 0.0):
        table = {}
        for s in range(n_seeds):
            p = np.clip(base + shift + rng.normal(0, seed_sd) + difficulty, 0, 1)
            table[s] = dict(zip(TASKS_OF, (rng.random(len(p)) < p).tolist()))
        rows.append(table)
    return rows[0], rows[1]


def coverage(gap: float, seed_sd: float, sims: int, n_seeds: int = 3) -> tuple[float, float]:
    """(share of intervals holding the true gap, share of decisive verdicts)."""
    rng = np.random.default_rng(0)
    held = decisive = 0
    for _ in range(sims):
        out = paired_gap(*simulate(rng, gap, seed_sd, n_seeds), TASKS_OF)
        held += out["low"] <= gap <= out["high"]
        decisive += out["verdict"] != "inconclusive"
    return held / sims, decisive / sims


def test_zero_gap_with_seed_noise_dominant_keeps_95_percent():
    # per-row seed sd 10 points, question SE of the gap ~3 points: a bootstrap over 3 seeds covers ~80 %
    held, decisive = coverage(0.0, 0.1, sims=400)
    assert held >= 0.9, f"coverage {held:.1%}"
    assert decisive <= 0.08, f"a zero gap called reproduced/contradicted {decisive:.1%} of the time"


def test_nonzero_gap_is_covered_too():
    held, _ = coverage(0.08, 0.1, sims=300)
    assert held >= 0.9, f"coverage {held:.1%}"


def test_a_clear_gap_with_agreeing_seeds_is_still_reproduced():
    """The interval is not made valid by being useless: 15 points with quiet seeds is found."""
    held, decisive = coverage(0.15, 0.005, sims=100)
    assert held >= 0.92 and decisive >= 0.97


def test_row_accuracy_interval_covers_the_true_accuracy():
    rng = np.random.default_rng(1)
    held = 0
    for _ in range(300):
        row, _ = simulate(rng, 0.0, 0.1)
        out = accuracy_ci(row, TASKS_OF)
        held += out["low"] <= 0.55 <= out["high"]
    assert held / 300 >= 0.9, f"coverage {held / 300:.1%}"


def test_two_seeds_cannot_call_a_zero_gap():
    """With one seed-to-seed difference to go on, a small observed gap stays inconclusive."""
    _, decisive = coverage(0.0, 0.1, sims=200, n_seeds=2)
    assert decisive <= 0.1
