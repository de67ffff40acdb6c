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
    prompt_tokens: int = 0  # with a shared prompt: every row starts with these same tokens (0: not shared)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def packed_tokens(self) -> int:
        """Tokens of its packed row (`pack_comparisons`): the shared prompt once, then each response."""
        return self.tokens - (len(self.rows) - 1) * self.prompt_tokens


def expand_comparison(c: Comparison, margin_scale: float = 0.0) -> tuple[list[tuple[int, int]], list[float], list[float]]:
    """The strict (better, worse) response pairs of a comparison, with per-prompt weights that sum
    to 1 and margins (margin_scale * score difference when the comparison has scores, else 0)."""
    pairs = c.pairs()
    if not pairs:
        return [], [], []
    weights = [1.0 / len(pairs)] * len(pairs)
    margins = [margin_scale * (c.margin(b, w) or 0.0) if margin_scale else 0.0 for b, w in pairs]
    return pairs, weights, margins


def encode_comparison(
    tokenizer, c: Comparison, max_length: int, max_prompt_share: float, margin_scale: float = 0.0, share_prompt: bool = False
) -> EncodedComparison:
    """Encode each distinct response of `c` once (the prompt once too), in rlhfkit's layout. With `share_prompt`
    every row keeps the same prompt tokens, those the longest response leaves (the truncation rule applied to
    it), so the rows can be packed into one (`pack_comparisons`); without, each row is truncated on its own."""
    prompt = encode_prompt(tokenizer, c.messages)
    distinct = list(dict.fromkeys(c.responses))
    responses = [encode_response(tokenizer, r) for r in distinct]
    if share_prompt:
        kept = truncate(prompt, max(responses, key=len), max_length, max_prompt_share)[0]
        rows = [kept + r[: max_length - len(kept)] for r in responses]
        truncated = sum(len(kept) < len(prompt) or len(kept) + len(r) > max_length for r in responses)
        prompt = kept
    else:
        kept = [truncate(prompt, r, max_length, max_prompt_share) for r in responses]
        rows, truncated = [p + r for p, r, _ in kept], sum(cut for *_, cut in kept)
    row_of = {r: i for i, r in enumerate(distinct)}
    pairs, weights, margins = expand_comparison(c, margin_scale)
    return EncodedComparison(
        rows, [(row_of[c.responses[b]], row_of[c.responses[w]]) for b, w in pairs], weights, margins, c.source, truncated,
        prompt_tokens=len(prompt) if share_prompt else 0,
    )  # fmt: skip


def comparison_dataset(spec, tokenizer, *, max_length: int, max_prompt_share: float, margin_scale: float, score_range, cache_dir, share_prompt: bool = False):
    """(records, encoded): the comparisons of `spec` as a memory-mapped dataset (`data.record_dataset`), and
    the same rows encoded as `encode_comparison` does (`data.tokenise`), with the columns rows, pairs,
    weights, margins, source, truncated, length (its longest row: a batch pads to it), tokens, n_pairs,
    n_rows, prompt_tokens, key and row. `encoded_from_row` turns a row back into an EncodedComparison."""
    from datasets import List, Value

    from ..data import record_dataset, record_from_row, tokenise

    def encode(row: dict) -> dict:
        e = encode_comparison(tokenizer, record_from_row(row, "comparisons"), max_length, max_prompt_share, margin_scale, share_prompt)
        return {"rows": e.rows, "pairs": e.pairs, "weights": e.weights, "margins": e.margins, "source": e.source,
                "truncated": e.truncated, "length": max(len(r) for r in e.rows), "tokens": e.tokens, "n_pairs": len(e.pairs),
                "n_rows": len(e.rows), "prompt_tokens": e.prompt_tokens}  # fmt: skip

    ints, floats = List(Value("int32")), List(Value("float64"))
    features = {
        "rows": List(ints), "pairs": List(ints), "weights": floats, "margins": floats, "source": Value("string"),
        "truncated": Value("int32"), "length": Value("int32"), "tokens": Value("int64"), "n_pairs": Value("int32"),
        "n_rows": Value("int32"), "prompt_tokens": Value("int32"),
    }  # fmt: skip
    records = record_dataset(spec, "comparisons", cache_dir, score_range=score_range)
    settings = {"max_length": max_length, "max_prompt_share": max_prompt_share, "margin_scale": margin_scale, "share_prompt": share_prompt}
    encoded = tokenise(records, encode, features, name="reward-comparisons", tokenizer=tokenizer, settings=settings, cache_dir=cache_dir)
    return records, encoded


def encoded_from_row(row: dict) -> EncodedComparison:
    pairs = [(better, worse) for better, worse in row["pairs"]]
    return EncodedComparison(row["rows"], pairs, row["weights"], row["margins"], row["source"], row["truncated"], row["row"], row["prompt_tokens"])


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


def pack_comparisons(items: Sequence[EncodedComparison], pad_token_id: int | None, device=None) -> dict[str, torch.Tensor]:
    """One row per comparison, right-padded: its shared prompt (`prompt_tokens`) once, then each row's own tokens.
    A response attends to the prompt and to its own earlier tokens only, and continues the prompt's positions,
    so it gets the hidden states it gets as a row of its own (tested), from fewer tokens (HH-RLHF: 1.5x).

    Returns input_ids and attention_mask ``(B, T)``, `position_ids`, `block_mask` ``(B, 1, T, T)`` (True: may
    attend) and `score_at` ``(2, rows)``: the (packed row, position) of each original row's score, in the order
    of ``[r for item in items for r in item.rows]``, read where `model.score_index` reads a row of its own."""
    ids, positions, segments, score_at = [], [], [], []
    for b, item in enumerate(items):
        shared = item.prompt_tokens
        row, pos, seg = list(item.rows[0][:shared]), list(range(shared)), [0] * shared
        for s, r in enumerate(item.rows, start=1):
            start = len(row) - shared  # where this row's own tokens go, minus the prompt they follow
            keep = [j for j, t in enumerate(r) if t != pad_token_id]
            last = keep[-1] if keep else len(r) - 1
            score_at.append((b, last if last < shared else start + last))
            row += r[shared:]
            pos += range(shared, len(r))
            seg += [s] * (len(r) - shared)
        ids.append(row)
        positions.append(pos)
        segments.append(seg)
    width = max(len(r) for r in ids)
    segment = pad(segments, -1, length=width)  # -1: padding
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # key in the prompt, or in the query's own row
    block_mask = (causal & same & (segment[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool)  # padding attends to itself
    batch = {
        "input_ids": pad(ids, pad_token_id if pad_token_id is not None else 0, length=width),
        "attention_mask": (segment >= 0).long(),
        "position_ids": pad(positions, 0, length=width),
        "block_mask": block_mask[:, None],
        "score_at": torch.tensor(score_at, dtype=torch.long).T,
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def comparisons_batch(items: Sequence[EncodedComparison], pad_token_id: int, packed: bool, device=None) -> dict[str, torch.Tensor]:
    """The batch of `items`' rows: one packed row per comparison (`pack_comparisons`), or each row its own."""
    if packed:
        return pack_comparisons(items, pad_token_id, device)
    return rows_to_batch([r for item in items for r in item.rows], pad_token_id, device=device)
