"""The maths of learning a policy directly from preferences (DPO, IPO), as small pure tensor functions.

Notation (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290): for a prompt x and a
preferred / dispreferred response y_w / y_l, `pi` the policy being tuned and `pi_ref` the frozen SFT policy,

    log-ratio        h(y)     = log pi(y | x) - log pi_ref(y | x)          (log-probs summed over response tokens)
    implicit reward  r(x, y)  = beta * h(y)                               (DPO's reward, up to a function of x)
    DPO loss                    -log sigmoid(beta * (h(y_w) - h(y_l)))     (eq. 7)
    IPO loss                    (h(y_w) - h(y_l) - 1 / (2 * beta))^2      (Azar et al. 2023, arXiv:2310.12036, eq. 17)

With label smoothing eps (the "conservative DPO" of Mitchell 2023, as TRL's `label_smoothing`), the labels are
assumed flipped with probability eps: -(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d), d = h(y_w) - h(y_l).

IPO regresses the log-ratio gap to the fixed target 1 / (2 beta) instead of pushing it to infinity, so it does not
over-fit deterministic preferences. Here h is summed over response tokens for both losses, as in both papers (TRL
divides IPO's log-probs by the response length; that is a different objective).

Shapes: ``logits (B, T, V)`` aligned so that ``logits[:, t]`` predicts ``tokens[:, t]``; ``mask (B, T)`` 1 on
response tokens (the EOS included), 0 on prompt and padding. Padded positions are replaced by 0 with ``torch.where``
before they are summed, so garbage there (even NaN) changes neither values nor gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo")


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask[b, t] * log softmax(logits[b, t])[tokens[b, t]]: one summed log-prob per row, ``(B,)``, in fp32.

    Token ids on masked positions may be anything (the padding id, -100); they are never used."""
    if logits.shape[:-1] != tokens.shape or tokens.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} do not align")
    keep = mask.bool()
    logits = torch.where(keep.unsqueeze(-1), logits.float(), 0.0)  # before the softmax: NaN there would reach the gradient
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(keep, tokens, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, 0.0).sum(-1)


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), per response."""
    return beta * (policy_logps - reference_logps)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss: str = "dpo",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss ``(P,)`` of DPO (sigmoid, with optional label smoothing) or IPO, from summed log-probs."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    gap = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # h(y_w) - h(y_l)
    if loss == "dpo":
        return -(1 - label_smoothing) * F.logsigmoid(beta * gap) - label_smoothing * F.logsigmoid(-beta * gap)
    if loss == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing is a DPO option; IPO's target 1/(2 beta) already keeps the gap finite")
        return (gap - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss {loss!r} (expected one of {', '.join(LOSSES)})")


def pair_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Summed (not averaged) statistics of a batch of pairs, as the training loop reduces them (`x_sum` / `x_count`):
    implicit-reward accuracy (a tie counts half), margin r_w - r_l, and the mean rewards of each side."""
    margin = (chosen_rewards - rejected_rewards).detach()
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    n = float(margin.numel())
    return {
        "accuracy_sum": correct.sum().item(), "accuracy_count": n,
        "margin_sum": margin.sum().item(), "margin_count": n,
        "reward_chosen_sum": chosen_rewards.detach().sum().item(), "reward_chosen_count": n,
        "reward_rejected_sum": rejected_rewards.detach().sum().item(), "reward_rejected_count": n,
    }  # fmt: skip


__all__ = ["LOSSES", "implicit_reward", "pair_statistics", "preference_loss", "sequence_logprobs"]
