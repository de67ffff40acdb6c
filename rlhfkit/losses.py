"""Losses more than one step uses: the SFT token loss of step 1, which step 3 adds as PPO-ptx."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import backbone_and_head
from .tokens import IGNORE_INDEX, Example, collate


def response_token_loss(model, input_ids, labels, attention_mask=None, position_ids=None):
    """Summed next-token cross-entropy over the trained tokens (labels != -100) of a causal LM: ``(loss_sum,
    n_tokens, n_correct)``. Logits are computed only at positions whose next token has a label, so a long
    prompt costs no vocabulary-sized logits."""
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # position t predicts token t+1
    logits = head(hidden[:, :-1][keep]).float()
    target = targets[keep]
    loss_sum = F.cross_entropy(logits, target, reduction="sum")
    correct = (logits.argmax(-1) == target).sum()
    return loss_sum, keep.sum(), correct


class ResponseLoss(torch.nn.Module):
    """Wraps a causal LM; forward returns `response_token_loss`. A module (not a function) so DDP sees an ordinary forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        return response_token_loss(self.model, input_ids, labels, attention_mask, position_ids)


def trained_tokens(example: Example) -> int:
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def batch_to_inputs(micro: list, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """A micro-batch of Examples (right-padded) or of packed rows, as model inputs."""
    if isinstance(micro[0], Example):
        batch = collate(micro, pad_token_id)
    else:  # packed rows: pad to the longest row; padding is its own masked segment
        length = max(r["input_ids"].shape[1] for r in micro)

        def padded(key, value):
            return torch.cat([torch.nn.functional.pad(r[key], (0, length - r[key].shape[1]), value=value) for r in micro])

        pos = torch.cat(
            [torch.cat([r["position_ids"], torch.arange(length - r["position_ids"].shape[1])[None]], 1) for r in micro]
        )
        batch = {"input_ids": padded("input_ids", pad_token_id), "labels": padded("labels", IGNORE_INDEX), "position_ids": pos}
    return {k: v.to(device) for k, v in batch.items()}
