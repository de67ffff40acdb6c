"""The hand-made rollout the multi-process tests share (imported by their worker scripts): 8 responses of random
lengths (every third without EOS), this process's share of them as `Samples`, and their experience."""

from __future__ import annotations

import torch

from rlhfkit.rl.math import first_eos_mask
from rlhfkit.rl.rollout import Samples
from rlhfkit.tokens import encode_prompt, pad


def hand_made_rollout(trainer, n: int = 8, group: int = 1):
    """(rollout, rows): the experience of this process's rows ``rows`` of ``n`` responses; ``group`` consecutive
    responses answer the same prompt (GRPO's groups), so each process's groups are whole."""
    acc, tok = trainer.accelerator, trainer.tokenizer
    g = torch.Generator().manual_seed(0)
    messages = [[{"role": "user", "content": f"tell me {i // group} things"}] for i in range(n)]
    responses = [torch.randint(3, 300, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
                 + ([tok.eos_token_id] if i % 3 else []) for i in range(n)]  # fmt: skip
    share = n // acc.num_processes
    rows = slice(acc.process_index * share, (acc.process_index + 1) * share)
    messages, responses = messages[rows], responses[rows]
    ids = [encode_prompt(tok, m) for m in messages]
    raw = pad(responses, tok.pad_token_id, length=8)
    mask, has_eos = first_eos_mask(raw, tok.eos_token_id, tok.pad_token_id)
    samples = Samples(messages, pad(ids, tok.pad_token_id, side="left"), pad([[1] * len(i) for i in ids], 0, side="left"),
                      raw.masked_fill(~mask, tok.pad_token_id), mask, has_eos)  # fmt: skip
    return trainer.experience(samples), rows
