"""The maths of step 3 (PPO, RLOO, GRPO, Dr. GRPO), as small pure tensor functions.

Everything here works on response tokens only. Shapes:

* ``logits``: ``(B, T, V)``, aligned so that ``logits[:, t]`` predicts ``tokens[:, t]``
  (the caller does the usual shift-by-one when slicing the model output).
* everything else per token: ``(B, T)``.
* ``mask``: ``(B, T)`` bool or 0/1 float, 1 on valid response tokens (up to and including
  the EOS / last token), 0 on padding. Responses are RIGHT-padded.

Padding never enters a loss or a statistic: padded entries are replaced by 0 with
``torch.where`` before anything else is done with them, so even NaN/inf garbage in
padded positions changes neither the values nor the gradients.

Where a function returns ``stats``, they are detached 0-dim tensors (call ``.item()``
when logging; we do not, to avoid a GPU sync per step).

Conventions for the KL: ``pi`` is the policy being tuned, ``pi_ref`` the frozen
reference (the SFT model). All estimators estimate KL(pi || pi_ref) from tokens
sampled from ``pi``; the tuned policy's log-probs always come FIRST.

Critic-free estimators work on one scalar reward per response, ``(B,)`` with ``B = prompts * k``:
the ``k`` responses to one prompt are consecutive rows (as ``generate(num_return_sequences=k)``
returns them).

References: Ziegler et al. 2019 (arXiv:1909.08593), Stiennon et al. 2020,
Ouyang et al. 2022, Schulman et al. 2017 (PPO), Schulman et al. 2015 (GAE),
J. Schulman, "Approximating KL divergence" (2020) for k1/k2/k3, Ahmadian et al. 2024
(RLOO, arXiv:2402.14740), Shao et al. 2024 (GRPO, arXiv:2402.03300), Liu et al. 2025
(Dr. GRPO, arXiv:2503.20783).
"""

from __future__ import annotations

import torch

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "rewards_with_kl",
    "gae",
    "clipped_surrogate",
    "policy_loss",
    "value_loss",
    "rloo_baseline",
    "rloo_advantages",
    "grpo_advantages",
    "per_token",
    "k3_in_loss",
    "token_weights",
    "weighted_token_sum",
    "aggregate",
    "explained_variance",
    "first_eos_mask",
    "last_valid_index",
]

KL_KINDS = ("k1", "k3", "abs", "mse")


from .kl_control import AdaptiveKLController, FixedKLController  # noqa: F401 (re-exported: the maths in one import)
from .logprobs import (  # noqa: F401
    _at_least_fp32,
    _bool_mask,
    _zero_padding,
    entropy_from_logits,
    first_eos_mask,
    last_valid_index,
    logprobs_from_logits,
)

# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid entries: ``sum(x * mask) / sum(mask)``.

    ``dim=None``: one scalar over the whole tensor; otherwise the mean along ``dim``
    (e.g. ``dim=1`` gives one value per row). Where there is no valid entry the result
    is 0 (not NaN). The mask is binary; non-zero means valid.
    """
    m = _bool_mask(mask)
    total = _zero_padding(x, m).sum() if dim is None else _zero_padding(x, m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def _valid_count(mask: torch.Tensor) -> int:
    return int(_bool_mask(mask).sum().item())


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over ALL valid entries (a scalar).

        var = sum(mask * (x - mean)^2) / (n - 1)     (unbiased; / n if unbiased=False)

    Raises ``ValueError`` when there are no valid entries, or only one with
    ``unbiased=True`` (the variance is undefined there; silently returning 0 or inf
    would poison whitening).
    """
    n = _valid_count(mask)
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, got {n}")
    mean = masked_mean(x, mask)
    centered = _zero_padding(x - mean, mask)
    return (centered**2).sum() / (n - 1 if unbiased else n)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` with the mean and (unbiased) variance of its valid entries.

        shift_mean=True:   (x - mean) / sqrt(var + eps)           -> mean 0, var 1
        shift_mean=False:  (x - mean) / sqrt(var + eps) + mean    -> mean kept, var 1

    (``shift_mean=False`` is the TRL convention, used e.g. to whiten rewards without
    changing their sign on average.) Padded entries of the output are 0.
    Raises like ``masked_var`` for fewer than 2 valid entries.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)


# --------------------------------------------------------------------------- KL and rewards


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from ``pi``.

    ``logprobs`` = log pi(x_t) of the TUNED policy (first argument),
    ``ref_logprobs`` = log pi_ref(x_t) of the frozen reference (second argument).
    With ``r = pi_ref(x) / pi(x) = exp(ref_logprobs - logprobs)``:

    * ``"k1"``:  log pi - log pi_ref = -log r. Unbiased, can be negative per token.
      This is the classic RLHF penalty (Ziegler et al.; Stiennon et al.).
      Swapping the arguments flips its sign.
    * ``"k3"``:  (r - 1) - log r. Unbiased (E_pi[r] = 1) and >= 0 per token, lower
      variance (Schulman 2020). 0 exactly when the two log-probs are equal.
    * ``"abs"``: |log pi - log pi_ref| (biased, >= 0).
    * ``"mse"``: 0.5 (log pi - log pi_ref)^2 (Schulman's k2; biased, >= 0, low variance).

    Shapes are element-wise; padding is the caller's (see ``rewards_with_kl``).
    """
    log_ratio = logprobs - ref_logprobs  # log pi - log pi_ref
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        # (r - 1) - log r with log r = -log_ratio; expm1 keeps precision when r ~ 1
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def rewards_with_kl(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards: a KL penalty on every token, the score on the last one.

        kl[b, t]      = kl_penalty(logprobs, ref_logprobs, kind)[b, t]   (0 on padding)
        rewards[b, t] = -beta * kl[b, t] + (scores[b] if t == last valid token of row b)

    ``scores`` ``(B,)`` is the reward model's scalar per response (after any
    normalisation / penalties the caller applies). The last valid token is found from
    ``mask``, whatever the response length. Returns ``(rewards, kl)``, both ``(B, T)``,
    0 on padding; ``kl`` is unscaled (for logging and the adaptive controller).
    Raises ``ValueError`` if a row has no valid token (nowhere to put its score).
    """
    m = _bool_mask(mask)
    kl = _zero_padding(kl_penalty(logprobs, ref_logprobs, kind), m)
    rewards = -beta * kl
    last = last_valid_index(m)
    if (last < 0).any():
        raise ValueError("rewards_with_kl: a row has no valid token to carry its score")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


# --------------------------------------------------------------------------- advantages


def _check_right_padded(mask: torch.Tensor) -> torch.Tensor:
    m = _bool_mask(mask)
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError(
            "mask must be right-padded (each row: valid tokens first, then padding only), "
            "over response tokens only"
        )
    return m


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over response tokens (Schulman et al. 2015).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (value-function targets)

    with ``V_{t+1} = 0`` and ``A_{t+1} = 0`` after the last valid token (the episode
    ends at EOS), so each row of a right-padded batch is handled with its own length.
    Padded positions of ``rewards`` / ``values`` are ignored; padded advantages and
    returns are 0. The mask must be right-padded (``ValueError`` otherwise).

    Outputs are DETACHED: they are targets, gradients must not flow through them.
    Raw advantages are returned; whitening (``masked_whiten``) is the caller's choice.
    """
    m = _check_right_padded(mask)
    rewards = _zero_padding(_at_least_fp32(rewards.detach()), m)
    values = _zero_padding(_at_least_fp32(values.detach()), m)

    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # V_{t+1}; 0 past the end of every row
    next_advantage = rewards.new_zeros(B)  # A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # on padding everything is 0, so the last valid token sees V_{t+1} = A_{t+1} = 0
        advantage = _zero_padding(advantage, m[:, t])
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = _zero_padding(advantages + values, m)
    return advantages, returns


# --------------------------------------------------------------------------- losses


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), NOT reduced: ``(B, T)``, 0 on padding.

        ratio = exp(logprobs - old_logprobs)
        l_t   = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - c, 1 + c))

    ``logprobs`` carries the gradient; ``old_logprobs`` (rollout-time policy) and ``advantages``
    are treated as constants (detached here). How the tokens are averaged is the caller's
    (``policy_loss``: a token mean; GRPO: ``token_weights``).

    stats (detached 0-dim tensors, token means):

    * ``clipfrac``: fraction of valid tokens where the CLIPPED term is the one chosen
      (strictly), i.e. tokens whose gradient is zeroed by clipping. Tokens outside the
      clip range on the harmless side (e.g. ratio > 1 + c with A < 0) do not count.
    * ``approx_kl``: mean_valid((ratio - 1) - log ratio), Schulman's k3 estimator of
      KL(pi_old || pi) on tokens sampled from pi_old (>= 0, unbiased, low variance).
      Useful for early stopping.
    * ``ratio_mean``: mean_valid(ratio), ~1 on the first epoch of a rollout.
    """
    m = _bool_mask(mask)
    # zero the padding BEFORE exp, so garbage there cannot reach values or gradients
    log_ratio = _zero_padding(logprobs - old_logprobs.detach(), m)
    advantages = _zero_padding(advantages.detach(), m)
    ratio = torch.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token_loss = _zero_padding(torch.maximum(unclipped, clipped), m)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return per_token_loss, stats


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, a masked mean over tokens (``clipped_surrogate`` averaged).

        loss = mean_valid( max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)) )
             = -mean_valid( min(ratio * A, clip(ratio) * A) )

    stats: as ``clipped_surrogate``.
    """
    per_token_loss, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    return masked_mean(per_token_loss, mask), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in the OpenAI baselines / Ziegler et al. PPO), masked mean.

        v_clipped = old_values + clamp(values - old_values, -c, c)
        loss      = 0.5 * mean_valid( max((values - R)^2, (v_clipped - R)^2) )

    ``values`` carries the gradient; ``old_values`` (rollout-time) and ``returns`` are
    detached here. The value coefficient (0.1 by default in the PPO config) is applied
    by the CALLER: ``total = policy_loss + vf_coef * value_loss``.

    stats: ``clipfrac`` = fraction of valid tokens where the clipped error is
    (strictly) the larger one, i.e. where clipping zeroes the gradient.
    """
    m = _bool_mask(mask)
    values = _zero_padding(values, m)
    old_values = _zero_padding(old_values.detach(), m)
    returns = _zero_padding(returns.detach(), m)

    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    error_unclipped = (values - returns).square()
    error_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(error_unclipped, error_clipped), m)

    with torch.no_grad():
        stats = {"clipfrac": masked_mean((error_clipped > error_unclipped).to(values.dtype), m)}
    return loss, stats


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """How much of the returns' variance the value head explains (valid tokens only).

        ev = 1 - Var[R - V] / Var[R]

    1 = perfect, 0 = no better than predicting the mean, < 0 = worse. NaN when the
    returns have zero variance (as in CleanRL / SB3). Detached 0-dim tensor. (The
    biased/unbiased choice cancels in the ratio; we use the biased one so that a single
    valid token does not raise.)
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    if var_returns.item() == 0:
        return torch.full_like(var_returns, float("nan"))
    return 1.0 - var_residual / var_returns


# --------------------------------------------------------------------------- critic-free advantages (RLOO, GRPO)


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` rewards as ``(B / k, k)`` groups, one row per prompt, in at least fp32."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(rewards.shape)}")
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"need k >= 2 responses per prompt and B a multiple of k; got B = {rewards.numel()}, k = {k}")
    return _at_least_fp32(rewards.detach()).view(-1, k)


def rloo_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The leave-one-out baseline of RLOO (Ahmadian et al. 2024): the mean reward of the OTHER k - 1
    responses to the same prompt.

        b_i = (sum_{j in group(i)} R_j - R_i) / (k - 1)

    ``rewards`` ``(B,)``, a prompt's k responses consecutive -> ``(B,)``, detached. It does not depend on
    R_i itself, so ``R_i - b_i`` is an unbiased REINFORCE advantage.
    """
    g = _groups(rewards, k)
    return ((g.sum(dim=1, keepdim=True) - g) / (k - 1)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO advantages: ``A_i = R_i - b_i`` (``rloo_baseline``) = ``k / (k - 1) * (R_i - mean_group R)``. ``(B,)``, detached."""
    return _at_least_fp32(rewards.detach()) - rloo_baseline(rewards, k)


def grpo_advantages(rewards: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024), one per response, ``(B,)``, detached.

        scale_by_std=True  (GRPO):     A_i = (R_i - mean_group R) / (std_group R + eps)
        scale_by_std=False (Dr. GRPO): A_i =  R_i - mean_group R

    ``std`` is the unbiased standard deviation of the k rewards of the group (as TRL); a group whose
    rewards are all equal gets advantages 0 either way. Liu et al. 2025 (Dr. GRPO) drop the std
    division: it weights prompts whose responses score alike (too easy or too hard) more.
    """
    g = _groups(rewards, k)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (g.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def per_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-response value ``(B,)`` on every valid token of its response: ``(B, T)``, 0 on padding."""
    m = _bool_mask(mask)
    return _zero_padding(values.detach().unsqueeze(1).expand(m.shape).to(torch.promote_types(values.dtype, torch.float32)), m)


def k3_in_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term per token (Shao et al. 2024, eq. 4), differentiable through the tuned policy's ``logprobs``:

        k3 = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1    (>= 0; its gradient is that of KL(pi_theta || pi_ref))

    ``(B, T)``, 0 on padding: the log-ratio is zeroed there BEFORE the exponential, so a -inf log-prob on
    padding (the pad id is outside the sampling support) gives neither inf nor a NaN gradient.
    """
    m = _bool_mask(mask)
    log_ratio = _zero_padding(logprobs - ref_logprobs.detach(), m)  # log pi_theta - log pi_ref
    return _zero_padding(kl_penalty(log_ratio, torch.zeros_like(log_ratio), "k3"), m)


LOSS_AGGREGATIONS = ("token", "sequence", "constant")


def token_weights(mask: torch.Tensor, aggregation: str = "token", max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How per-token losses ``l`` are averaged into one loss: per-token weights ``w`` ``(B, T)`` (0 on
    padding) and per-response units ``u`` ``(B,)`` such that the loss of a (mini)batch is

        loss = sum_{b,t} w[b, t] * l[b, t] / sum_b u[b]

    * ``"token"``:    w = 1,              u = length of response b   -> mean over all valid tokens
      (PPO, RLOO; DAPO's token-level mean: long responses weigh by their length).
    * ``"sequence"``: w = 1 / len_b,      u = 1   -> mean over responses of each response's token mean
      (GRPO's 1/|o_i| sum_t, Shao et al. 2024).
    * ``"constant"``: w = 1 / max_tokens, u = 1   -> sum over tokens / (responses * max_tokens)
      (Dr. GRPO, Liu et al. 2025: no length normalisation, so short wrong answers are not favoured).

    The units are summed over a minibatch (and over processes) by the caller, so micro-batches and
    processes do not change the update.
    """
    m = _bool_mask(mask)
    lengths = m.sum(dim=1).to(torch.float32)
    if aggregation == "token":
        w, units = m.to(torch.float32), lengths
    elif aggregation == "sequence":
        w, units = m / lengths.clamp(min=1).unsqueeze(1), torch.ones_like(lengths)
    elif aggregation == "constant":
        if not max_tokens or max_tokens < 1:
            raise ValueError(f"aggregation 'constant' needs max_tokens >= 1, got {max_tokens}")
        w, units = m / float(max_tokens), torch.ones_like(lengths)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {LOSS_AGGREGATIONS}")
    return w.to(torch.float32), units


def weighted_token_sum(x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t} weights[b, t] * x[b, t]`` over valid tokens; the padding of ``x`` is zeroed first, so NaN/inf
    there changes neither the value nor the gradient (0 * NaN would be NaN)."""
    return (_zero_padding(x, mask) * weights).sum()


def aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token", max_tokens: int | None = None) -> torch.Tensor:
    """One batch's loss from per-token losses ``x`` ``(B, T)``: ``sum(w * x) / sum(u)`` with ``token_weights``."""
    weights, units = token_weights(mask, aggregation, max_tokens)
    return weighted_token_sum(x, weights, mask) / units.sum().clamp(min=1e-12)
