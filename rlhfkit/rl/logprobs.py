"""Log-probs and masks of sampled response tokens, as pure tensor functions (shapes and padding
conventions as in `rlhfkit.rl.math`): the response mask cut after the first EOS, and the log-probs and
entropy of the sampler's own distribution (softmax of logits / temperature over the sampling support)."""

from __future__ import annotations

import torch

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
