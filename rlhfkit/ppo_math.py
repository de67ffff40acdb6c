"""The PPO maths for RLHF, as small pure tensor functions.

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

References: Ziegler et al. 2019 (arXiv:1909.08593), Stiennon et al. 2020,
Ouyang et al. 2022, Schulman et al. 2017 (PPO), Schulman et al. 2015 (GAE),
J. Schulman, "Approximating KL divergence" (2020) for k1/k2/k3.
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
    "policy_loss",
    "value_loss",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
    "first_eos_mask",
    "last_valid_index",
]

KL_KINDS = ("k1", "k3", "abs", "mse")


# --------------------------------------------------------------------------- helpers


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 float or bool mask as bool (non-zero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 (fp32/fp64 are left as they are). Differentiable."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padded entries replaced by 0 (robust to NaN/inf there, unlike x * mask)."""
    return torch.where(_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row: ``(B, T) -> (B,)`` long.

    Works for any mask (not only right-padded ones): it is the largest ``t`` with
    ``mask[b, t] != 0``. Rows with no valid position get ``-1``.
    """
    m = _bool_mask(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).max(dim=-1).values


def first_eos_mask(
    tokens: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token mask of sampled responses, truncated after the first EOS.

    ``tokens``: ``(B, T)`` sampled response ids (prompt already removed).
    Returns ``(mask, has_eos)``:

    * ``mask`` ``(B, T)`` bool: True up to and INCLUDING the first EOS, False after it
      (whatever was sampled after the first EOS is not part of the response).
    * ``has_eos`` ``(B,)`` bool: whether the row contains an EOS at all.

    A row without EOS was cut at the length limit: all its tokens are valid, except a
    trailing run of ``pad_token_id`` (rows right-padded to a common length). Pad ids
    before the last non-pad token are kept (pad != EOS, so it is an ordinary token
    there). Callers typically penalise ``~has_eos`` rows and may replace the invalid
    tokens by ``pad_token_id`` with ``tokens.masked_fill(~mask, pad_token_id)``.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device).expand_as(tokens)

    is_eos = tokens == eos_token_id
    has_eos = is_eos.any(dim=1)
    # first EOS position; T (= past the end) where there is none
    first_eos = torch.where(is_eos, positions, T).min(dim=1).values
    # without EOS: everything up to the last non-pad token
    last_non_pad = last_valid_index(tokens != pad_token_id)
    last_kept = torch.where(has_eos, first_eos, last_non_pad)
    mask = positions <= last_kept.unsqueeze(1)
    return mask, has_eos


# --------------------------------------------------------------------------- log-probs


# fp32 elements of one no-grad log-softmax chunk (512 MB): old / reference log-probs of a long rollout
# with a large vocabulary are computed a few rows at a time instead of all at once.
_NO_GRAD_CHUNK_ELEMENTS = 2**27


def _scaled_log_softmax(logits: torch.Tensor, temperature: float, support: torch.Tensor | None) -> torch.Tensor:
    """log softmax(logits / temperature) over the ``support`` ids (the others get -inf), in at least fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _at_least_fp32(logits)
    if temperature != 1.0:
        z = z / temperature
    if support is not None:
        z = z.masked_fill(~support.to(z.device), float("-inf"))
    return torch.log_softmax(z, dim=-1)


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Slices of the leading dimension. Under autograd all rows at once (the backward keeps the fp32
    log-softmax anyway); without, as many rows as fit in ``_NO_GRAD_CHUNK_ELEMENTS``."""
    rows = logits.shape[0]
    if logits.requires_grad and torch.is_grad_enabled() or rows == 0:
        return [slice(None)]
    step = max(1, _NO_GRAD_CHUNK_ELEMENTS // max(1, logits[0].numel()))
    return [slice(i, i + step) for i in range(0, rows, step)]


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)`` over the ``support`` ids.

        logp[b, t] = z[b, t, tokens[b, t]] - logsumexp_{v in support} z[b, t, v],   z = logits / temperature

    ``logits`` ``(B, T, V)``, ``tokens`` ``(B, T)`` -> ``(B, T)``, differentiable.

    ``temperature`` and ``support`` (a ``(V,)`` bool mask, None: every id) must be those the
    responses were sampled with (`rlhfkit.generate.sampling_support`), so that the PPO ratio and the
    KL refer to the distribution that actually produced the tokens. A token outside the support
    gets -inf (it cannot have been sampled; the losses zero padded positions before using them).

    Precision: bf16/fp16 logits are UPCAST to fp32 (a bf16 log-softmax is off by ~1e-2 nats);
    the result is fp32 (fp64 stays fp64). Memory: one ``log_softmax(...).gather``; without
    autograd (old / reference log-probs) it runs on chunks of rows so that the fp32 copy stays
    under ~512 MB.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not align"
        )
    return torch.cat([
        _scaled_log_softmax(logits[rows], temperature, support).gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
        for rows in _row_chunks(logits)
    ])  # fmt: skip


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the ``support`` ids per position: ``(B, T, V) -> (B, T)``.

        H = -sum_v p_v log p_v   (ids outside the support have p_v = 0 and add nothing)

    Upcasts to fp32 and chunks like ``logprobs_from_logits``.
    """
    out = []
    for rows in _row_chunks(logits):
        logp = _scaled_log_softmax(logits[rows], temperature, support)
        p = logp.exp()
        if support is not None:  # p * log p is 0 * -inf = nan there (and so is its gradient): use log p = 0
            logp = logp.masked_fill(~support.to(logp.device), 0.0)
        out.append(-(p * logp).sum(dim=-1))
    return torch.cat(out)


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


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), a masked mean over tokens.

        ratio = exp(logprobs - old_logprobs)
        loss  = mean_valid( max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)) )
              = -mean_valid( min(ratio * A, clip(ratio) * A) )

    ``logprobs`` carries the gradient; ``old_logprobs`` (rollout-time policy) and
    ``advantages`` are treated as constants (detached here).

    stats (detached 0-dim tensors):

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
    loss = masked_mean(torch.maximum(unclipped, clipped), m)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


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


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """Constant KL coefficient beta."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the signature matches ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a P-controller.

        error = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + error * n_steps / horizon)

    ``current_kl`` is the KL per RESPONSE (sum over its tokens of the k1 ``kl`` from
    ``rewards_with_kl``, averaged over the batch), in the same unit as ``target``
    (nats per response). ``n_steps`` is the number of responses (episodes) in the
    batch, as in the paper and TRL.

    ``state_dict()`` holds beta as a Python float, so ``load_state_dict`` restores it
    bit-exactly. Only beta is restored: ``target`` and ``horizon`` come from the
    (resumed) run's config, i.e. the constructor.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
