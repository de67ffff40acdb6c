"""From (prompt, response) text to the token rows a reward model reads, and comparisons to training items.

Two layouts (`model.LAYOUT_*`): rlhfkit's own models read the chat-templated prompt with the assistant
header, then the response tokens and EOS (what the policy samples); models trained elsewhere read the
conversation as their own chat template renders it (TRL's `RewardTrainer` does so), end-of-turn tokens
included. Either way a response that was cut without EOS is read cut: no EOS, no end of turn. Over-long
rows are truncated by the SFT rule (`tokens.truncate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import Comparison
from ..tokens import encode_prompt, encode_response, pad, render_prompt, truncate
from .model import LAYOUT_CHAT_TEMPLATE, LAYOUT_EOS


def _template_response(tokenizer, messages: list[dict], response: str) -> list[int] | None:
    """The response as the chat template renders an assistant turn after the prompt (end of turn included),
    or None when the template's rendering of the whole conversation does not start with the prompt's."""
    prompt_text = render_prompt(tokenizer, messages)
    whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    if not whole.startswith(prompt_text):
        return None
    return tokenizer(whole[len(prompt_text) :], add_special_tokens=False)["input_ids"]


def encode_for_reward(
    tokenizer,
    messages: list[dict],
    response: str,
    max_length: int,
    max_prompt_share: float,
    *,
    complete: bool = True,
    layout: str = LAYOUT_EOS,
    prompt_ids: list[int] | None = None,
) -> tuple[list[int], bool]:
    """(token ids of prompt + response in `layout`, whether they were truncated). A response that is not
    `complete` (cut without EOS) gets neither EOS nor the template's end of turn."""
    prompt = encode_prompt(tokenizer, messages) if prompt_ids is None else prompt_ids
    resp = None
    if layout == LAYOUT_CHAT_TEMPLATE and complete:
        resp = _template_response(tokenizer, messages, response)
    if resp is None:  # rlhfkit's layout, a cut response, or a template whose turns do not concatenate
        resp = encode_response(tokenizer, response, add_eos=complete)
    prompt, resp, truncated = truncate(prompt, resp, max_length, max_prompt_share)
    return prompt + resp, truncated


def encode_pair_text(tokenizer, messages: list[dict], response: str, max_length: int, max_prompt_share: float) -> list[int]:
    """Token ids of prompt + response + EOS (rlhfkit's layout), truncated by the SFT rule: the same layout
    the policy samples (chat-templated prompt with the assistant header, then the response tokens and EOS)."""
    return encode_for_reward(tokenizer, messages, response, max_length, max_prompt_share)[0]


@dataclass
class EncodedComparison:
    """One prompt's comparison, ready to train on: one row per distinct response, the strict pairs as
    row indices, their weights (1/number of pairs: they sum to 1) and margins."""

    rows: list[list[int]]
    pairs: list[tuple[int, int]]  # (better row, worse row)
    weights: list[float]
    margins: list[float]
    source: str = ""
    truncated: int = 0  # rows truncated to max_length

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def expand_comparison(c: Comparison, margin_scale: float = 0.0) -> tuple[list[tuple[int, int]], list[float], list[float]]:
    """The strict (better, worse) response pairs of a comparison, with per-prompt weights that sum
    to 1 and margins (margin_scale * score difference when the comparison has scores, else 0)."""
    pairs = c.pairs()
    if not pairs:
        return [], [], []
    weights = [1.0 / len(pairs)] * len(pairs)
    margins = [margin_scale * (c.margin(b, w) or 0.0) if margin_scale else 0.0 for b, w in pairs]
    return pairs, weights, margins


def encode_comparison(tokenizer, c: Comparison, max_length: int, max_prompt_share: float, margin_scale: float = 0.0) -> EncodedComparison:
    """Encode each distinct response of `c` once (the prompt once too), in rlhfkit's layout."""
    prompt = encode_prompt(tokenizer, c.messages)
    row_of: dict[str, int] = {}
    rows, index, truncated = [], [], 0
    for response in c.responses:
        if response not in row_of:
            ids, cut = encode_for_reward(tokenizer, c.messages, response, max_length, max_prompt_share, prompt_ids=prompt)
            row_of[response] = len(rows)
            rows.append(ids)
            truncated += cut
        index.append(row_of[response])
    pairs, weights, margins = expand_comparison(c, margin_scale)
    return EncodedComparison(rows, [(index[b], index[w]) for b, w in pairs], weights, margins, c.source, truncated)


def response_scores(c: Comparison, row_scores: list[float]) -> list[float]:
    """Scores per response of `c` from the scores of its distinct-response rows (`encode_comparison`'s order)."""
    row_of: dict[str, int] = {}
    for r in c.responses:
        row_of.setdefault(r, len(row_of))
    return [row_scores[row_of[r]] for r in c.responses]


def rows_to_batch(rows: Sequence[list[int]], pad_token_id: int, side: str = "right", device=None) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad(list(rows), pad_token_id, side=side),
        "attention_mask": pad([[1] * len(r) for r in rows], 0, side=side),
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
