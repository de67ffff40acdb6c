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
    index: int | None = None  # its row in a comparison dataset (the frozen-feature cache's key); None in a list

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


def comparison_dataset(spec, tokenizer, *, max_length: int, max_prompt_share: float, margin_scale: float, score_range, cache_dir):
    """(records, encoded): the comparisons of `spec` as a memory-mapped dataset (`data.record_dataset`), and
    the same rows encoded as `encode_comparison` does (`data.tokenise`), with the columns rows, pairs,
    weights, margins, source, truncated, length (its longest row: a batch pads to it), tokens, n_pairs,
    n_rows, key and row. `encoded_from_row` turns a row back into an EncodedComparison."""
    from datasets import List, Value

    from ..data import record_dataset, record_from_row, tokenise

    def encode(row: dict) -> dict:
        e = encode_comparison(tokenizer, record_from_row(row, "comparisons"), max_length, max_prompt_share, margin_scale)
        return {"rows": e.rows, "pairs": e.pairs, "weights": e.weights, "margins": e.margins, "source": e.source,
                "truncated": e.truncated, "length": max(len(r) for r in e.rows), "tokens": e.tokens, "n_pairs": len(e.pairs), "n_rows": len(e.rows)}  # fmt: skip

    ints, floats = List(Value("int32")), List(Value("float64"))
    features = {
        "rows": List(ints), "pairs": List(ints), "weights": floats, "margins": floats, "source": Value("string"),
        "truncated": Value("int32"), "length": Value("int32"), "tokens": Value("int64"), "n_pairs": Value("int32"),
        "n_rows": Value("int32"),
    }  # fmt: skip
    records = record_dataset(spec, "comparisons", cache_dir, score_range=score_range)
    settings = {"max_length": max_length, "max_prompt_share": max_prompt_share, "margin_scale": margin_scale}
    encoded = tokenise(records, encode, features, name="reward-comparisons", tokenizer=tokenizer, settings=settings, cache_dir=cache_dir)
    return records, encoded


def encoded_from_row(row: dict) -> EncodedComparison:
    pairs = [(better, worse) for better, worse in row["pairs"]]
    return EncodedComparison(row["rows"], pairs, row["weights"], row["margins"], row["source"], row["truncated"], row["row"])


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
