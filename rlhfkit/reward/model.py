"""The reward model: a transformers sequence-classification model with one label, read at the last token.

`RewardModel` wraps any `AutoModelForSequenceClassification` model with `num_labels=1` (rlhfkit's own,
TRL's `RewardTrainer` output, a hub reward model). Its `forward` reads the score where transformers
reads it (the rightmost token that is not padding), with positions counted over real tokens only, so
left- and right-padded rows score the same; `score_hidden` is the head alone, which PPO calls on
hidden states it computed itself (the frozen-block cache).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..models import (
    apply_lora,
    backbone_and_head,
    disable_dropout,
    load_causal_lm,
    only_blocks,
    resolve_model,
    sync_model_with_tokenizer,
    train_only_top_layers,
)

# How the text of a (prompt, response) is laid out for the model (`stats["input_layout"]`):
# rlhfkit's models read prompt (chat template + assistant header) + response tokens + EOS, the tokens the
# policy samples, so PPO can hand them its own token ids; models trained elsewhere (TRL renders the whole
# conversation with the chat template) read the conversation as their template renders it.
LAYOUT_EOS = "prompt+response+eos"
LAYOUT_CHAT_TEMPLATE = "chat_template"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of `attention_mask` (left or right padding alike)."""
    mask = attention_mask.long()
    length = mask.shape[-1]
    return length - 1 - mask.flip(-1).argmax(-1)


def score_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where the score is read: the last real token that is not the pad id, as transformers'
    `*ForSequenceClassification` reads it (a model trained with pad = EOS reads the token before a final EOS)."""
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    keep = torch.where(keep.any(-1, keepdim=True), keep, attention_mask.bool())  # a row of pads only: its last real token
    return last_token_index(keep)


def score_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The `score` head of a decoder sequence-classification model (Llama, Qwen, Mistral, GPT-2, ...: a linear
    layer read at the last token; encoders' `classifier` heads pool otherwise and are not read). While LoRA
    trains, the copy peft trains in its ModulesToSaveWrapper; under PPO's critic adapters ("all-linear" wraps
    the head too), the head's own weights (the reward model is always read with the adapters off)."""
    head = getattr(model, "score", None)
    copies = getattr(head, "modules_to_save", None)
    if copies is not None and head.active_adapter in copies:
        head = copies[head.active_adapter]
    head = getattr(head, "base_layer", head)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `score` head read at the last token: rlhfkit reads decoder reward models")
    return head


class RewardModel(torch.nn.Module):
    """A sequence-classification model with one label; `forward` returns one float32 score per row.

    `lm` is the transformers model (peft-wrapped while LoRA trains), `head` its `score` layer, `stats`
    the normalisation and settings saved with it (empty for a model without statistics)."""

    def __init__(self, model: PreTrainedModel, stats: dict | None = None):
        super().__init__()
        self.lm = model
        self.stats: dict = dict(stats or {})

    @property
    def head(self) -> torch.nn.Linear:
        hf = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return score_head(hf)

    @property
    def pad_token_id(self) -> int | None:
        return self.lm.config.pad_token_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, frozen: torch.Tensor | None = None, split: int = 0,
        position_ids: torch.Tensor | None = None, block_mask: torch.Tensor | None = None, score_at: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Scores of the rows; with `frozen` (`frozen_features(..., split)` of these rows) only the blocks
        from `split` up run. A packed batch (`encoding.pack_comparisons`) brings its positions, its block mask
        and where each score is read."""
        backbone = backbone_and_head(self.lm)[0]
        inputs = self._inputs(attention_mask, position_ids, block_mask)
        if frozen is None:
            hidden = backbone(input_ids=input_ids, **inputs).last_hidden_state
        else:
            with only_blocks(backbone, split):
                hidden = backbone(inputs_embeds=frozen, **inputs).last_hidden_state
        if score_at is None:
            score_at = (torch.arange(hidden.shape[0], device=hidden.device), score_index(input_ids, attention_mask, self.pad_token_id))
        rows, at = (i.to(hidden.device) for i in score_at)
        return self.score_hidden(hidden[rows, at])

    @torch.no_grad()
    def frozen_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int,
        position_ids: torch.Tensor | None = None, block_mask: torch.Tensor | None = None, score_at=None,
    ) -> torch.Tensor:  # fmt: skip
        """The output of the lower `split` blocks, ``(B, T, H)``: what `forward(..., frozen, split)` continues from."""
        backbone = backbone_and_head(self.lm)[0]
        with only_blocks(backbone, 0, split):
            return backbone(input_ids=input_ids, **self._inputs(attention_mask, position_ids, block_mask)).last_hidden_state

    def _inputs(self, attention_mask: torch.Tensor, position_ids: torch.Tensor | None, block_mask: torch.Tensor | None) -> dict:
        if position_ids is None:
            # Positions count real tokens only, so a left-padded row sees the same positions as a right-padded one.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if block_mask is not None:  # transformers takes a 4D mask as it is: booleans for SDPA, additive for eager
            if self.lm.config._attn_implementation != "sdpa":
                block_mask = torch.zeros(block_mask.shape, device=block_mask.device).masked_fill(~block_mask, torch.finfo(torch.float32).min)
            attention_mask = block_mask
        return {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}

    def score_hidden(self, last: torch.Tensor) -> torch.Tensor:
        """Scores from the final hidden states at the score positions, ``(B, H) -> (B,)``."""
        head = self.head
        # The head runs in its own dtype (float32 when trained), outside bf16 autocast.
        with torch.autocast(device_type=last.device.type, enabled=False):
            return head(last.to(head.weight.dtype)).squeeze(-1).float()


def init_head(head: torch.nn.Linear) -> None:
    # As in Stiennon et al. / lm-human-preferences: the initial scores have unit-ish scale.
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


@contextlib.contextmanager
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def sequence_classifier_from(name: str, tokenizer, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """`AutoModelForSequenceClassification` with one label on the body of causal LM `name` (a folder,
    hub id, 'default' or an SFT adapter folder), its embeddings matching `tokenizer`, dropout off."""
    path = resolve_model(name)
    if (Path(path) / "config.json").exists() or not Path(path).exists():
        # transformers reports the new `score` head as missing from the checkpoint: it is, init_head sets it.
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    else:  # an adapter folder: merge it into its base, then move the body over
        lm = load_causal_lm(path, tokenizer, dtype=dtype)
        config = lm.config
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        backbone_and_head(model)[0].load_state_dict(backbone_and_head(lm)[0].state_dict())
    sync_model_with_tokenizer(model, tokenizer)  # pad row at the mean embedding, pad_token_id in the config
    disable_dropout(model)
    return model


def build_reward_model(name: str, tokenizer, *, dtype: torch.dtype = torch.float32, lora=None, train_top_layers: int = 0) -> RewardModel:
    """A fresh reward model on top of causal LM `name` (dropout off; LoRA adapters if enabled, with the
    head in peft's `modules_to_save`; only the top `train_top_layers` blocks, the final norm and the head
    trained if > 0)."""
    model = sequence_classifier_from(name, tokenizer, dtype)
    init_head(score_head(model))
    if lora is not None and lora.enabled:
        # task SEQ_CLS: peft trains and saves the score head in full beside the adapters (modules_to_save).
        model = apply_lora(model, lora, task_type="SEQ_CLS", top_layers=train_top_layers)
    train_only_top_layers(model, train_top_layers)
    rm = RewardModel(model, {"input_layout": LAYOUT_EOS})
    rm.head.requires_grad_(True)  # train_only_top_layers froze it with everything outside the top blocks
    return rm
