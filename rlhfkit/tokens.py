"""From conversations to token ids: chat template, EOS, loss masks and the truncation rule.

The prompt is rendered with the tokenizer's chat template and a generation prompt (the
assistant header), exactly as it is rendered when the model is sampled later; the response
is tokenised on its own and followed by EOS. So training sees the same token boundary as
generation, and the response mask is exact.

Truncation rule (over-long examples are truncated, never dropped): when prompt + response
exceed `max_length`, the prompt loses its oldest tokens first, but keeps at least
`max_prompt_share * max_length` tokens (or all it has); then the response is cut at its end,
and a cut response has no EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DataCollatorWithFlattening

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def render_prompt(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """Chat-template text of `messages` followed by the assistant header."""
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list[dict], max_length: int | None = None, system_prompt: str | None = None) -> list[int]:
    """Token ids of the rendered prompt, keeping the newest `max_length` tokens."""
    ids = tokenizer(render_prompt(tokenizer, messages, system_prompt), add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


@dataclass
class Example:
    """One tokenised (prompt, response): labels are -100 on the prompt, the token ids on the response."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def truncate(prompt: list[int], response: list[int], max_length: int, max_prompt_share: float) -> tuple[list[int], list[int], bool]:
    """Apply the truncation rule in the module docstring."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    prompt_budget = max(max_length - len(response), math.ceil(max_prompt_share * max_length))
    prompt = prompt[-min(len(prompt), prompt_budget):]
    response = response[: max_length - len(prompt)]
    return prompt, response, True


def encode_example(tokenizer, messages: list[dict], response: str, max_length: int, max_prompt_share: float = 0.5) -> Example:
    """Prompt + response + EOS, with the prompt masked out of the labels."""
    prompt, resp, truncated = truncate(
        encode_prompt(tokenizer, messages), encode_response(tokenizer, response), max_length, max_prompt_share
    )
    return Example(prompt + resp, [IGNORE_INDEX] * len(prompt) + resp, len(prompt), truncated)


def pad(sequences: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """Stack lists of ids into one tensor, padded with `value` on `side`."""
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[i, : len(seq)] = seq
        else:
            out[i, length - len(seq) :] = seq
    return out


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    input_ids = pad([e.input_ids for e in examples], pad_token_id)
    attention_mask = pad([[1] * len(e) for e in examples], 0)
    labels = pad([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: list[Example], max_length: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Greedy packing of examples into rows of at most `max_length` tokens (order kept).

    Each row is built by transformers' DataCollatorWithFlattening: `position_ids` restart at 0 for every
    example and there is no attention_mask, so transformers builds a block-diagonal causal mask from the
    position ids and examples never attend to each other; the first label of each example is -100, so no
    token is trained to follow the previous example. (The collator flattens a whole batch into one row;
    splitting examples into rows of at most max_length, which the data plan batches, stays ours.)
    """
    rows, current = [], []
    for ex in examples:
        if current and sum(len(e) for e in current) + len(ex) > max_length:
            rows.append(current)
            current = []
        current.append(ex)
    if current:
        rows.append(current)
    flatten = DataCollatorWithFlattening(return_tensors="pt")
    return [flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in row]) for row in rows]
