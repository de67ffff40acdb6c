"""The statistics of `rlhfkit evaluate`, as pure functions of per-prompt numbers (no model, no I/O).

* `win_rate`: share of prompts where A's response scores higher than B's (a tie counts half), with its standard
  error over prompts, the win/tie/loss counts and the paired score difference with its standard error.
* `length_controlled_win_rate`: the win rate with the length difference regressed out, as length-controlled
  AlpacaEval does (Dubois et al. 2024): a logistic regression of the outcome on the standardised length
  difference, read at zero length difference.
* `best_of_n_choice` and `best_of_n_kl`: which of n candidates the reward model keeps, and the KL of that
  best-of-n policy from the sampling policy, log n - (n-1)/n (Stiennon et al. 2020; Hilton & Gao's bound).
* `agreement`: how often two scorers prefer the same one of two responses.
* `significant`: whether an estimate is at least 2 standard errors from its no-change value.
"""

from __future__ import annotations

import math
from typing import Sequence


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample std with n - 1, over sqrt n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per prompt: 1 if A scored higher than B, 0.5 for a tie, 0 if lower."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(a: Sequence[float], b: Sequence[float]) -> dict:
    """Share of prompts where A's response scores higher than B's (ties half), with its standard error; the
    win/tie/loss counts; the mean paired score difference A - B with its standard error."""
    won = outcomes(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    return {
        "rate": mean(won),
        "stderr": stderr(won),
        "wins": sum(o == 1.0 for o in won),
        "ties": sum(o == 0.5 for o in won),
        "losses": sum(o == 0.0 for o in won),
        "score_delta": mean(diffs),
        "score_delta_stderr": stderr(diffs),
    }


# ----------------------------------------------------------------------------- length control


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _solve2(h: list[list[float]], g: list[float]) -> list[float]:
    """h^-1 g for a 2x2 matrix h."""
    det = h[0][0] * h[1][1] - h[0][1] * h[1][0]
    return [(h[1][1] * g[0] - h[0][1] * g[1]) / det, (h[0][0] * g[1] - h[1][0] * g[0]) / det]


def logistic_fit(x: Sequence[float], y: Sequence[float], ridge: float = 1e-6, iterations: int = 100) -> tuple[float, float, list[list[float]]]:
    """Maximum-likelihood (a, b) of P(y = 1) = sigmoid(a + b x) for outcomes y in [0, 1] (a tie is y = 0.5),
    with a tiny ridge on b only: it keeps b finite when the length difference separates wins from losses
    perfectly, and leaves a well defined when every x is 0. Newton's method with step halving on the
    (strictly concave) penalised log-likelihood. Returns (a, b, covariance of (a, b)), the covariance the
    robust sandwich H^-1 (sum g g^T) H^-1 * n / (n - 1), which is honest about ties and a misfit curve, and
    with every x = 0 makes the standard error of sigmoid(a) exactly that of the raw win rate.

    A 2-parameter fit with fractional outcomes: scikit-learn's LogisticRegression takes 0/1 labels only, and
    neither it nor statsmodels is a dependency.
    """
    n = len(x)

    def objective(a: float, b: float) -> float:
        total = -ridge * b * b / 2
        for xi, yi in zip(x, y):
            z = a + b * xi
            # log sigmoid(z) = -log(1 + e^-z), written to stay finite for large |z|
            log_p = -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))
            log_q = log_p - z  # log(1 - sigmoid(z)) = log sigmoid(z) - z
            total += yi * log_p + (1 - yi) * log_q
        return total

    def grad_hess(a: float, b: float) -> tuple[list[float], list[list[float]]]:
        g, h = [0.0, -ridge * b], [[0.0, 0.0], [0.0, ridge]]
        for xi, yi in zip(x, y):
            p = _sigmoid(a + b * xi)
            w = p * (1 - p)
            g[0] += yi - p
            g[1] += (yi - p) * xi
            h[0][0] += w
            h[0][1] += w * xi
            h[1][1] += w * xi * xi
        h[1][0] = h[0][1]
        return g, h  # h is minus the Hessian (positive definite)

    a, b = 0.0, 0.0
    value = objective(a, b)
    for _ in range(iterations):
        g, h = grad_hess(a, b)
        if h[0][0] * h[1][1] - h[0][1] ** 2 < 1e-12:  # every p at 0 or 1: nothing left to fit
            break
        step = _solve2(h, g)
        t = 1.0
        while t > 1e-10:
            a_new, b_new = a + t * step[0], b + t * step[1]
            new_value = objective(a_new, b_new)
            if new_value >= value - 1e-12:
                break
            t /= 2
        converged = abs(new_value - value) < 1e-12 and max(abs(a_new - a), abs(b_new - b)) < 1e-9
        a, b, value = a_new, b_new, new_value
        if converged:
            break

    _, h = grad_hess(a, b)
    det = h[0][0] * h[1][1] - h[0][1] * h[1][0]
    if det < 1e-12:
        return a, b, [[float("nan")] * 2, [float("nan")] * 2]
    h_inv = [[h[1][1] / det, -h[0][1] / det], [-h[1][0] / det, h[0][0] / det]]
    meat = [[0.0, 0.0], [0.0, 0.0]]
    for xi, yi in zip(x, y):
        r = yi - _sigmoid(a + b * xi)
        gi = (r, r * xi)
        for i in range(2):
            for j in range(2):
                meat[i][j] += gi[i] * gi[j]
    scale = n / (n - 1) if n > 1 else float("nan")
    cov = [[scale * sum(h_inv[i][k] * meat[k][m] * h_inv[m][j] for k in range(2) for m in range(2)) for j in range(2)] for i in range(2)]
    return a, b, cov


def length_controlled_win_rate(a: Sequence[float], b: Sequence[float], length_a: Sequence[float], length_b: Sequence[float]) -> dict:
    """The win rate of A over B at equal length: fit P(A wins) = sigmoid(theta + phi * d / std(d)) with
    d = length_a - length_b per prompt (ties count half), and report sigmoid(theta), the predicted win rate at
    zero length difference (length-controlled AlpacaEval's recipe, without its per-instruction term). A scorer
    that only rewards length gives 0.5 however often A is longer; a gain that is not length stays.

    AlpacaEval squashes d with tanh to bound very long outputs; responses here are capped at max_new_tokens,
    and on a synthetic judge that only rewards length (plus noise) tanh left a bias of about +0.03 where the
    linear term leaves none. If d separates wins from losses perfectly and no pair has equal lengths, the data
    say nothing about d = 0 and the estimate is arbitrary (its stderr is then large).
    `stderr` is the delta-method standard error sigmoid'(theta) * se(theta); `length_slope` is phi."""
    y = outcomes(a, b)
    d = [float(x - z) for x, z in zip(length_a, length_b, strict=True)]
    if len(y) != len(d):
        raise ValueError(f"{len(y)} score pairs but {len(d)} length pairs")
    if not y:
        return {"rate": float("nan"), "stderr": float("nan"), "length_slope": float("nan"), "mean_length_difference": float("nan")}
    if min(y) == max(y):  # A always won (or always lost, or tied): so it does at every length difference
        return {"rate": y[0], "stderr": 0.0, "length_slope": 0.0, "mean_length_difference": mean(d)}
    spread = math.sqrt(mean([(v - mean(d)) ** 2 for v in d]))  # population std of d
    x = [v / spread if spread > 0 else 0.0 for v in d]
    theta, phi, cov = logistic_fit(x, y)
    rate = _sigmoid(theta)
    return {
        "rate": rate,
        "stderr": rate * (1 - rate) * math.sqrt(cov[0][0]) if math.isfinite(cov[0][0]) else float("nan"),
        "length_slope": phi,
        "mean_length_difference": mean(d),
    }


# ----------------------------------------------------------------------------- best-of-n


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) in nats: log n - (n - 1) / n (exact for distinct samples; an upper bound otherwise)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_choice(scores: Sequence[Sequence[float]], n: int) -> list[int]:
    """Per prompt, the index of the highest-scoring of its first n candidates (the first one on a tie)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    out = []
    for i, row in enumerate(scores):
        if len(row) < n:
            raise ValueError(f"prompt {i}: {len(row)} candidates, best-of-{n} needs {n}")
        out.append(max(range(n), key=lambda j: (row[j], -j)))
    return out


# ----------------------------------------------------------------------------- comparing scorers


def agreement(first: Sequence[float], second: Sequence[float]) -> dict:
    """Two scorers' differences (A - B) per prompt: the share of prompts where both prefer the same response,
    over the prompts where neither is tied."""
    both = [(x, y) for x, y in zip(first, second, strict=True) if x != 0 and y != 0]
    same = [1.0 if (x > 0) == (y > 0) else 0.0 for x, y in both]
    return {"rate": mean(same), "stderr": stderr(same), "prompts": len(both)}


def significant(value: float | None, error: float | None, null: float = 0.0) -> bool | None:
    """Whether `value` lies at least 2 standard errors from `null` (None if either is unknown); `null` itself never
    does (all ties give a standard error of 0)."""
    if value is None or error is None or not math.isfinite(value) or not math.isfinite(error):
        return None
    return value != null and abs(value - null) >= 2 * error


__all__ = [
    "agreement",
    "best_of_n_choice",
    "best_of_n_kl",
    "length_controlled_win_rate",
    "logistic_fit",
    "mean",
    "outcomes",
    "significant",
    "stderr",
    "win_rate",
]
