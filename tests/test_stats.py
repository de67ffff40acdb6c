"""The evaluation's statistics (rlhfkit/stats.py), each against a hand computation or a synthetic judge."""

from __future__ import annotations

import math
import random

import pytest

from rlhfkit.stats import (
    agreement,
    best_of_n_choice,
    best_of_n_kl,
    length_controlled_win_rate,
    logistic_fit,
    significant,
    win_rate,
)

from conftest import WORDS


def test_win_rate_by_hand():
    w = win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0])
    assert (w["rate"], w["wins"], w["ties"], w["losses"]) == (0.625, 2, 1, 1)
    # outcomes 1, .5, 0, 1: sample variance 0.22917 over 4 -> stderr 0.23936; diffs 1, 0, -1, 4: mean 1
    assert w["stderr"] == pytest.approx(math.sqrt((0.375**2 + 0.125**2 + 0.625**2 + 0.375**2) / 3 / 4))
    assert w["score_delta"] == pytest.approx(1.0) and w["score_delta_stderr"] == pytest.approx(math.sqrt(14 / 3 / 4))


def test_logistic_fit_without_a_feature_is_the_mean():
    """With every x = 0 the fit is the log-odds of the mean outcome, and its standard error that of the mean."""
    y = [1, 1, 0.5, 0, 1]
    a, b, cov = logistic_fit([0.0] * 5, y)
    assert a == pytest.approx(math.log(0.7 / 0.3), abs=1e-6) and b == 0.0
    p = 0.7
    assert p * (1 - p) * math.sqrt(cov[0][0]) == pytest.approx(win_rate(y, [0.5] * 5)["stderr"], rel=1e-5)


def test_length_controlled_win_rate_by_hand():
    """Two length differences, +2 (A wins 3 of 4) and -2 (A wins 1 of 2): two points, two parameters, so the
    fit goes through both shares, logit .75 = ln 3 and logit .5 = 0, and at zero difference it reads
    sigmoid(ln 3 / 2) = sqrt 3 / (1 + sqrt 3) = 0.6340, below the raw 4/6."""
    a = [1, 1, 1, 0, 1, 0]
    lengths_a, lengths_b = [3, 3, 3, 3, 1, 1], [1, 1, 1, 1, 3, 3]
    lc = length_controlled_win_rate(a, [0.5] * 6, lengths_a, lengths_b)
    assert lc["rate"] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-6)
    assert win_rate(a, [0.5] * 6)["rate"] == pytest.approx(4 / 6)
    # d = +-2 with mean 2/3: std sqrt(4 - 4/9); the slope takes the shares from 0.5 to 0.75 over d = 2 std units
    std = math.sqrt(4 - 4 / 9)
    assert lc["length_slope"] == pytest.approx(math.log(3) / 2 / (2 / std), abs=1e-5)
    assert lc["mean_length_difference"] == pytest.approx(2 / 3)


def _text(rng: random.Random, words: int, marker: bool = False) -> str:
    out = [rng.choice(WORDS[:-3]) for _ in range(words)]  # never "banana" by chance
    if marker:
        out[rng.randrange(words)] = "banana"
    return " ".join(out)


def test_length_controlled_is_one_half_when_the_judge_only_rewards_length():
    """The "RLHF" responses are longer most of the time, and the judge scores the word count: the raw win
    rate is high, the length-controlled one 0.5."""
    rng = random.Random(0)
    sft = [_text(rng, rng.randint(10, 40)) for _ in range(300)]
    rlhf = [_text(rng, max(1, len(s.split()) + rng.randint(-8, 20))) for s in sft]

    def judge(text):
        return float(len(text.split()))

    length = [len(t.split()) for t in rlhf], [len(t.split()) for t in sft]
    raw = win_rate([judge(t) for t in rlhf], [judge(t) for t in sft])
    lc = length_controlled_win_rate([judge(t) for t in rlhf], [judge(t) for t in sft], *length)
    assert raw["rate"] > 0.7
    assert lc["rate"] == pytest.approx(0.5, abs=1e-3)

    # a noisy length-only judge: 0.5 within its standard error
    rng = random.Random(1)

    def noisy(text):
        return len(text.split()) + rng.gauss(0, 5)

    a, b = [noisy(t) for t in rlhf * 4], [noisy(t) for t in sft * 4]
    lc = length_controlled_win_rate(a, b, length[0] * 4, length[1] * 4)
    assert win_rate(a, b)["rate"] > 0.65
    assert abs(lc["rate"] - 0.5) < 2 * lc["stderr"] and lc["stderr"] < 0.03
    assert lc["length_slope"] > 1


def test_length_controlled_stays_above_one_half_for_a_marker_word_at_equal_length():
    """Same lengths pairwise; the judge rewards the word "banana", which RLHF uses more often."""
    rng = random.Random(2)
    words = [rng.randint(5, 30) for _ in range(200)]
    sft = [_text(rng, n, marker=rng.random() < 0.2) for n in words]
    rlhf = [_text(rng, n, marker=rng.random() < 0.6) for n in words]

    def judge(text):
        return float("banana" in text.split())

    a, b = [judge(t) for t in rlhf], [judge(t) for t in sft]
    lc = length_controlled_win_rate(a, b, words, words)
    raw = win_rate(a, b)
    assert lc["rate"] > 0.5 + 2 * lc["stderr"]
    assert lc["rate"] == pytest.approx(raw["rate"], abs=1e-6) and lc["stderr"] == pytest.approx(raw["stderr"], rel=1e-4)

    # with lengths that vary but do not matter to the judge, the gain stays
    other = [n + rng.randint(-5, 15) for n in words]
    rlhf = [_text(rng, max(1, n), marker="banana" in t.split()) for n, t in zip(other, rlhf)]
    a = [judge(t) for t in rlhf]
    lc = length_controlled_win_rate(a, b, [len(t.split()) for t in rlhf], words)
    assert lc["rate"] > 0.5 + 2 * lc["stderr"]


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.636
    assert best_of_n_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)  # 1.835
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_choice_keeps_the_favourite_of_the_first_n():
    scores = [[0.1, 0.9, 0.5, 2.0], [3.0, 3.0, -1.0, 0.0], [-2.0, -1.0, -3.0, -0.5]]
    assert best_of_n_choice(scores, 2) == [1, 0, 1]  # a tie keeps the first
    assert best_of_n_choice(scores, 4) == [3, 0, 3]
    assert best_of_n_choice(scores, 1) == [0, 0, 0]
    with pytest.raises(ValueError, match="prompt 0: 4 candidates, best-of-5"):
        best_of_n_choice(scores, 5)


def test_agreement_and_significance():
    ag = agreement([1.0, -2.0, 0.5, 0.0, 3.0], [2.0, 1.0, 0.1, 1.0, 0.5])  # the tie (4th) is left out
    assert ag["prompts"] == 4 and ag["rate"] == 0.75
    assert significant(0.62, 0.05, 0.5) is True and significant(0.58, 0.05, 0.5) is False
    assert significant(-0.3, 0.1) is True and significant(None, 0.1) is None and significant(0.3, float("nan")) is None
    assert significant(0.5, 0.0, 0.5) is False and significant(0.75, 0.0, 0.5) is True  # all ties; all wins


def test_length_controlled_when_one_side_always_wins():
    lc = length_controlled_win_rate([2.0, 3.0, 4.0], [1.0, 1.0, 1.0], [5, 9, 2], [7, 3, 2])
    assert (lc["rate"], lc["stderr"]) == (1.0, 0.0)
    lc = length_controlled_win_rate([1.0, 1.0], [1.0, 1.0], [5, 9], [7, 3])
    assert lc["rate"] == 0.5
