"""The comparison loss (InstructGPT): every strict (better, worse) pair of a prompt costs
-log sigmoid(r_better - r_worse - margin) (+ centering_coef * (r_better + r_worse)^2); the pair losses
of a prompt are averaged, then summed over prompts, so every prompt weighs the same whatever its K."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .encoding import EncodedComparison


def pair_terms(encoded: Sequence[EncodedComparison], device=None) -> dict[str, torch.Tensor]:
    """Flattened pair indices into the concatenated rows of `encoded`, with weights and margins."""
    better, worse, weights, margins, offset = [], [], [], [], 0
    for e in encoded:
        better += [offset + b for b, _ in e.pairs]
        worse += [offset + w for _, w in e.pairs]
        weights += e.weights
        margins += e.margins
        offset += len(e.rows)
    return {
        "better": torch.tensor(better, dtype=torch.long, device=device),
        "worse": torch.tensor(worse, dtype=torch.long, device=device),
        "weights": torch.tensor(weights, dtype=torch.float32, device=device),
        "margins": torch.tensor(margins, dtype=torch.float32, device=device),
    }


def comparison_loss(scores: torch.Tensor, terms: dict[str, torch.Tensor], centering_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over prompts of the mean pair loss of each prompt, and summed stats for the log."""
    r_b, r_w = scores[terms["better"]], scores[terms["worse"]]
    diff = r_b - r_w
    per_pair = -F.logsigmoid(diff - terms["margins"])
    if centering_coef:
        per_pair = per_pair + centering_coef * (r_b + r_w) ** 2
    loss_sum = (terms["weights"] * per_pair).sum()
    with torch.no_grad():
        correct = (diff > 0).float().sum() + 0.5 * (diff == 0).float().sum()
        stats = {
            "loss_sum": loss_sum.item(),
            "loss_count": float(terms["weights"].sum().round().item()),  # = prompts with pairs
            "accuracy_sum": correct.item(),
            "accuracy_count": float(diff.numel()),
            "margin_sum": diff.sum().item(),
            "margin_count": float(diff.numel()),
        }
    return loss_sum, stats
