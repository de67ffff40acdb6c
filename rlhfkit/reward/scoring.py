"""Scoring text with a reward model: raw scores, normalised scores, and when token ids can be shared.

Normalised score = (raw - stats["mean"]) / stats["std"], the statistics saved with the model (in its
config.json, `reward_stats`); a model without them is used raw (`load_reward_model` warns).
Length, truncation, precision and layout default to those the model was trained with (`rm.stats`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ..data import Comparison
from .encoding import encode_for_reward, rows_to_batch
from .model import LAYOUT_CHAT_TEMPLATE, LAYOUT_EOS, RewardModel

DEFAULT_MAX_LENGTH = 1024  # for models that do not say what they were trained with


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def scoring_autocast(device: torch.device, precision: str | None, module: torch.nn.Module):
    """bf16 autocast when asked and the weights are float32 (as in training), else nothing."""
    if precision == "bf16" and next(module.parameters()).dtype == torch.float32:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def score_rows(rm: torch.nn.Module, rows: Sequence[list[int]], pad_token_id: int, batch_size: int = 16, precision: str | None = None) -> list[float]:
    """Raw scores of token-id rows (each a full prompt + response), batched by length."""
    was_training = rm.training
    rm.eval()
    device = _device_of(rm)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = rows_to_batch([rows[i] for i in idx], pad_token_id, device=device)
        with scoring_autocast(device, precision, rm):
            scores = rm(**batch)
        for i, s in zip(idx, scores.tolist()):
            out[i] = s
    rm.train(was_training)
    return out


def normalise_scores(raw: Sequence[float], stats: dict | None) -> list[float]:
    stats = stats or {}
    mean, std = stats.get("mean", 0.0), stats.get("std", 1.0) or 1.0
    return [(r - mean) / std for r in raw]


def layout_of(rm) -> str:
    """How `rm` reads text (`model.LAYOUT_*`): rlhfkit's models say so in their statistics."""
    return (getattr(rm, "stats", None) or {}).get("input_layout", LAYOUT_CHAT_TEMPLATE)


def shares_tokens(rm, rm_tokenizer, policy_tokenizer) -> bool:
    """Whether `rm` can read the policy's token ids as they are (prompt + sampled response up to EOS):
    same vocabulary, same chat template and EOS, and rlhfkit's layout. Otherwise the text is re-encoded."""
    return (
        layout_of(rm) == LAYOUT_EOS
        and rm_tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        and rm_tokenizer.chat_template == policy_tokenizer.chat_template
        and rm_tokenizer.eos_token_id == policy_tokenizer.eos_token_id
    )


def reads_policy_vocabulary(rm_tokenizer, policy_tokenizer) -> bool:
    """Whether a network on the reward model's body can read the policy's token ids (the critic initialised
    from it): every token of the reward model has the same id for the policy, which adds at most its pad
    token (rlhfkit adds one when pad = EOS; a model trained elsewhere on the same base often lacks it)."""
    rm_vocab, policy_vocab = rm_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if any(policy_vocab.get(token) != i for token, i in rm_vocab.items()):
        return False
    return set(policy_vocab) - set(rm_vocab) <= {policy_tokenizer.pad_token}


def scoring_settings(rm, max_length=None, max_prompt_share=None, precision=None) -> tuple[int, float, str]:
    stats = getattr(rm, "stats", {}) or {}
    return (
        max_length or stats.get("max_length", DEFAULT_MAX_LENGTH),
        max_prompt_share or stats.get("max_prompt_share", 0.5),
        precision or stats.get("precision", "fp32"),
    )


def encode_rows(rm, tokenizer, messages_list: Sequence[list[dict]], responses: Sequence[str], complete: Sequence[bool] | None = None,
                max_length: int | None = None, max_prompt_share: float | None = None) -> list[list[int]]:  # fmt: skip
    """The rows `rm` reads for (prompt, response) texts, in its own layout (a response not `complete` stays cut)."""
    if len(messages_list) != len(responses):
        raise ValueError(f"{len(messages_list)} prompts for {len(responses)} responses")
    complete = [True] * len(responses) if complete is None else list(complete)
    max_length, share, _ = scoring_settings(rm, max_length, max_prompt_share)
    layout = layout_of(rm)
    return [
        encode_for_reward(tokenizer, m, r, max_length, share, complete=done, layout=layout)[0]
        for m, r, done in zip(messages_list, responses, complete)
    ]


@torch.no_grad()
def score(
    rm: RewardModel,
    tokenizer,
    messages_list: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 16,
    normalise: bool = True,
    *,
    complete: Sequence[bool] | None = None,
    max_length: int | None = None,
    max_prompt_share: float | None = None,
    precision: str | None = None,
) -> list[float]:
    """Scores of (prompt, response) pairs; normalised = (raw - stats["mean"]) / stats["std"].

    `complete[i]` False: response i was cut without EOS and is read cut (default: all complete).
    """
    rows = encode_rows(rm, tokenizer, messages_list, responses, complete, max_length, max_prompt_share)
    precision = scoring_settings(rm, precision=precision)[2]
    raw = score_rows(rm, rows, tokenizer.pad_token_id, batch_size, precision)
    return normalise_scores(raw, rm.stats) if normalise else raw


@torch.no_grad()
def score_comparisons(rm: RewardModel, tokenizer, comparisons: Sequence[Comparison], batch_size: int = 16, normalise: bool = False, **settings) -> list[list[float]]:
    """Scores of every response of every comparison (raw by default)."""
    messages = [c.messages for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    flat = score(rm, tokenizer, messages, responses, batch_size, normalise, **settings)
    out, i = [], 0
    for c in comparisons:
        out.append(flat[i : i + len(c.responses)])
        i += len(c.responses)
    return out
