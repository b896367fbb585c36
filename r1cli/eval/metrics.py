"""Benchmark metrics as DeepSeek-R1 reports them, each with a bootstrap confidence interval.

    pass@1  mean correctness over the k samples of each problem, averaged over problems
    pass@k  the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021) from n samples, c correct
    cons@k  majority vote over the first k samples' normalised answers; a tie goes to the answer that
            appeared first, and the vote is right when the winning answer is a correct one
"""

from __future__ import annotations

import math
import random
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """cons@k for one problem: the most frequent answer among the first k (None never wins) is a right one."""
    if k > len(answers):
        raise ValueError(f"cons@{k} needs at least {k} samples per problem, got {len(answers)}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers[:k] if a is not None and votes[a] == top)  # ties: the first to appear
    return any(ok for a, ok in zip(answers[:k], correct[:k]) if a == winner)


def bootstrap_ci(values: list[float], reps: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over problems, resampling problems with replacement."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi


def summarise(per_problem: list[dict], ks: tuple[int, ...] = (1,), cons: tuple[int, ...] = ()) -> dict:
    """per_problem: [{"correct": [bool] * n, "answers": [str | None] * n}] -> metric -> {value, ci_low, ci_high}."""
    out = {}

    def add(name, values):
        lo, hi = bootstrap_ci(values)
        out[name] = {"value": sum(values) / len(values), "ci_low": lo, "ci_high": hi}

    add("pass@1", [sum(p["correct"]) / len(p["correct"]) for p in per_problem])
    for k in ks:
        if k > 1:
            add(f"pass@{k}", [pass_at_k(len(p["correct"]), sum(p["correct"]), k) for p in per_problem])
    for k in cons:
        add(f"cons@{k}", [float(majority_correct(p["answers"], p["correct"], k)) for p in per_problem])
    return out
