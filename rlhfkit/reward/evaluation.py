"""Measuring a reward model on held-out comparisons: pairwise accuracy (overall and per source) beside
the longer-response baseline, mean margin, loss, and a calibration table; and printing them."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch

from ..data import Comparison
from .model import RewardModel
from .scoring import score_comparisons


def comparison_metrics(comparisons: Sequence[Comparison], scores: Sequence[Sequence[float]], bins: int = 10) -> dict:
    """Pairwise accuracy (overall and per `source`), mean margin, calibration and the length baseline
    (the longer response, in characters, wins; ties count half), from raw scores."""
    if len(comparisons) != len(scores):
        raise ValueError("one list of scores per comparison")
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    confidences, hits = [], []
    prompt_acc, loss_sum, n_prompts = [], 0.0, 0
    for c, s in zip(comparisons, scores):
        pairs = c.pairs()
        if not pairs:
            continue
        correct_here, loss_here = 0.0, 0.0
        for b, w in pairs:
            m = s[b] - s[w]
            hit = 1.0 if m > 0 else 0.5 if m == 0 else 0.0
            lb, lw = len(c.responses[b]), len(c.responses[w])
            length_hit = 1.0 if lb > lw else 0.5 if lb == lw else 0.0
            for key in ("all", c.source or "(none)"):
                g = groups[key]
                g["pairs"] += 1
                g["correct"] += hit
                g["length_correct"] += length_hit
                g["margin"] += m
            correct_here += hit
            loss_here += max(-m, 0.0) + math.log1p(math.exp(-abs(m)))  # -log sigmoid(m), stably
            # Calibration on the model's own side: P(higher-scored response is the better one).
            confidences.append(1.0 / (1.0 + math.exp(-abs(m))))
            hits.append(hit)
        prompt_acc.append(correct_here / len(pairs))
        loss_sum += loss_here / len(pairs)
        n_prompts += 1

    def summary(g) -> dict:
        n = g["pairs"]
        return {
            "pairs": int(n),
            "accuracy": g["correct"] / n if n else float("nan"),
            "length_baseline_accuracy": g["length_correct"] / n if n else float("nan"),
            "mean_margin": g["margin"] / n if n else float("nan"),
        }

    overall = summary(groups["all"])
    by_source = {k: summary(g) for k, g in sorted(groups.items()) if k != "all"}
    table, ece = [], 0.0
    edges = [0.5 + 0.5 * i / bins for i in range(bins + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [i for i, p in enumerate(confidences) if lo <= p < hi or (hi == 1.0 and p == 1.0)]
        if not inside:
            table.append({"bin": [lo, hi], "count": 0, "predicted": None, "observed": None})
            continue
        pred = sum(confidences[i] for i in inside) / len(inside)
        obs = sum(hits[i] for i in inside) / len(inside)
        ece += len(inside) / len(confidences) * abs(pred - obs)
        table.append({"bin": [lo, hi], "count": len(inside), "predicted": pred, "observed": obs})
    return {
        "comparisons": n_prompts,
        **overall,
        "accuracy_per_prompt": sum(prompt_acc) / len(prompt_acc) if prompt_acc else float("nan"),
        "loss": loss_sum / n_prompts if n_prompts else float("nan"),
        "by_source": by_source,
        "calibration": table,
        "expected_calibration_error": ece if confidences else float("nan"),
        "calibration_note": "predicted = sigmoid(|margin|), the model's probability that its higher-scored response is "
        "the preferred one; observed = how often it is (ties count half)",
    }


@torch.no_grad()
def evaluate_reward_model(
    rm: RewardModel,
    tokenizer,
    comparisons: Sequence[Comparison],
    batch_size: int = 16,
    bins: int = 10,
    **settings,
) -> dict:
    """Score every response once and compute `comparison_metrics` (accuracy overall and per source,
    mean margin, calibration table, length baseline)."""
    scores = score_comparisons(rm, tokenizer, comparisons, batch_size, normalise=False, **settings)
    return comparison_metrics(comparisons, scores, bins)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalar part of `comparison_metrics`, per-source accuracies as `accuracy/<source>`."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for source, m in metrics.get("by_source", {}).items():
        out[f"accuracy/{source}"] = m["accuracy"]
        out[f"length_baseline_accuracy/{source}"] = m["length_baseline_accuracy"]
    return out


def print_evaluation(metrics: dict) -> None:
    """Accuracy per subset next to the length baseline, then the calibration table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"reward model accuracy on {metrics.get('data', 'comparisons')}")
    for col in ("subset", "pairs", "accuracy", "length baseline", "mean margin"):
        table.add_column(col, justify="left" if col == "subset" else "right")

    def row(name, m, style=None):
        table.add_row(name, str(m["pairs"]), f"{m['accuracy']:.3f}", f"{m['length_baseline_accuracy']:.3f}", f"{m['mean_margin']:.3f}", style=style)

    for name, m in metrics["by_source"].items():
        row(name, m)
    row("all", metrics, style="bold")
    console.print(table)
    cal = Table(title=f"calibration: P(higher-scored wins) = sigmoid(|margin|); ECE {metrics['expected_calibration_error']:.3f}")
    for col in ("predicted bin", "pairs", "mean predicted", "observed"):
        cal.add_column(col, justify="right")
    for b in metrics["calibration"]:
        if b["count"]:
            cal.add_row(f"{b['bin'][0]:.2f}-{b['bin'][1]:.2f}", str(b["count"]), f"{b['predicted']:.3f}", f"{b['observed']:.3f}")
    console.print(cal)
