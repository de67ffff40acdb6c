"""Step 2: a reward model trained from human rankings.

The model is the causal LM's transformer body with a scalar head (`nn.Linear(hidden, 1)`)
read at the last real token of prompt + response (the EOS that ends a complete response).

Loss, as in InstructGPT: a comparison of K responses to one prompt gives every strict
(better, worse) pair, K(K-1)/2 without ties. Each pair costs -log sigmoid(r_better - r_worse
- margin) (+ centering_coef * (r_better + r_worse)^2); the pair losses of a prompt are
averaged, then the prompts. So every prompt weighs the same whatever its K, and all pairs of a
prompt are in one batch: one comparison is one item of the data plan, and its K responses are
K forward rows (each response is encoded once, not once per pair).

After training the scores are normalised: the head bias is shifted so that reference
responses (SFT demonstrations, or the best responses of the training comparisons) score 0 on
average; their standard deviation is recorded in `reward_stats.json`, which PPO reads.

Saved folder (`final/` of a run):
    config.json, model.safetensors, tokenizer files   the causal LM, LoRA merged (loads with
                                                       AutoModelForCausalLM.from_pretrained)
    adapter/                                           the unmerged LoRA adapter (LoRA runs only)
    reward_head.safetensors                            head.weight (1, hidden), head.bias (1,)
    reward_stats.json                                  mean, std, base_model, lora, max_length, ...
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import RewardConfig
from .data import Comparison, Demonstration, load_comparisons, load_demonstrations, split_by_prompt
from .generate import model_path_of
from .models import backbone_and_head, enable_activation_checkpointing, load_causal_lm, load_tokenizer, resolve_model, save_model
from .tokens import encode_prompt, encode_response, pad, truncate
from .training import (
    DataPlan,
    RunDir,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    save_run_config,
    seed_everything,
    total_steps_for,
    train_supervised,
)

log = logging.getLogger("rlhfkit.reward")

HEAD_FILE = "reward_head.safetensors"
STATS_FILE = "reward_stats.json"
ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------- the model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of `attention_mask` (left or right padding alike)."""
    mask = attention_mask.long()
    length = mask.shape[-1]
    return length - 1 - mask.flip(-1).argmax(-1)


class RewardModel(torch.nn.Module):
    """A causal LM's body with a scalar head; `forward` returns one float32 score per row."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear | None = None, stats: dict | None = None):
        super().__init__()
        self.lm = lm
        if head is None:
            hidden = lm.config.hidden_size
            head = torch.nn.Linear(hidden, 1)
            # As in Stiennon et al. / lm-human-preferences: the initial scores have unit-ish scale.
            torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
            torch.nn.init.zeros_(head.bias)
        self.head = head
        self.stats: dict = dict(stats or {})  # filled after training / by load_reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = backbone_and_head(self.lm)[0]
        # Positions count real tokens only, so a left-padded row sees the same positions as a right-padded one.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score_hidden(hidden[rows, last_token_index(attention_mask).to(hidden.device)])

    def score_hidden(self, last: torch.Tensor) -> torch.Tensor:
        """Scores from the final hidden states at the last tokens, ``(B, H) -> (B,)``."""
        # The head runs in its own dtype (float32 when trained), outside bf16 autocast.
        with torch.autocast(device_type=last.device.type, enabled=False):
            return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()


def build_reward_model(name: str, tokenizer, *, dtype: torch.dtype = torch.float32, lora=None, train_top_layers: int = 0) -> RewardModel:
    """A fresh reward model on top of causal LM `name` (dropout off; LoRA adapters if enabled; only the
    top `train_top_layers` transformer blocks, the final norm and the head trained if > 0)."""
    lm = load_causal_lm(name, tokenizer, dtype=dtype, dropout=False, lora=lora, train_top_layers=train_top_layers)
    rm = RewardModel(lm)
    _freeze_unused_lm_head(rm)
    return rm


def _freeze_unused_lm_head(rm: RewardModel) -> None:
    """The LM head is not used by the reward model: freeze it unless it is tied to the input
    embeddings (DDP refuses trainable parameters that get no gradient)."""
    hf = rm.lm.get_base_model() if hasattr(rm.lm, "get_base_model") else rm.lm
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.weight.requires_grad_(False)


# ----------------------------------------------------------------------------- encoding


def _encode(tokenizer, messages, response, max_length, max_prompt_share, prompt_ids=None) -> tuple[list[int], bool]:
    prompt = encode_prompt(tokenizer, messages) if prompt_ids is None else prompt_ids
    prompt, resp, truncated = truncate(prompt, encode_response(tokenizer, response, add_eos=True), max_length, max_prompt_share)
    return prompt + resp, truncated


def encode_pair_text(tokenizer, messages: list[dict], response: str, max_length: int, max_prompt_share: float) -> list[int]:
    """Token ids of prompt + response + EOS, truncated by the SFT rule: the same layout the policy
    samples (chat-templated prompt with the assistant header, then the response tokens and EOS)."""
    return _encode(tokenizer, messages, response, max_length, max_prompt_share)[0]


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
    """Encode each distinct response of `c` once (the prompt once too)."""
    prompt = encode_prompt(tokenizer, c.messages)
    row_of: dict[str, int] = {}
    rows, index, truncated = [], [], 0
    for response in c.responses:
        if response not in row_of:
            ids, cut = _encode(tokenizer, c.messages, response, max_length, max_prompt_share, prompt_ids=prompt)
            row_of[response] = len(rows)
            rows.append(ids)
            truncated += cut
        index.append(row_of[response])
    pairs, weights, margins = expand_comparison(c, margin_scale)
    return EncodedComparison(rows, [(index[b], index[w]) for b, w in pairs], weights, margins, c.source, truncated)


def rows_to_batch(rows: Sequence[list[int]], pad_token_id: int, side: str = "right", device=None) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad(list(rows), pad_token_id, side=side),
        "attention_mask": pad([[1] * len(r) for r in rows], 0, side=side),
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


# ----------------------------------------------------------------------------- loss


def pair_terms(encoded: Sequence[EncodedComparison], device=None) -> dict[str, torch.Tensor]:
    """Flattened pair indices into the concatenated rows of `encoded`, with weights and margins."""
    better, worse, weights, margins, offset = [], [], [], [], 0
    for e in encoded:
        better += [offset + b for b, _ in e.pairs]
        worse += [offset + w for _, w in e.pairs]
        weights += e.weights
        margins += e.margins
        offset += len(e.rows)
    return {
        "better": torch.tensor(better, dtype=torch.long, device=device),
        "worse": torch.tensor(worse, dtype=torch.long, device=device),
        "weights": torch.tensor(weights, dtype=torch.float32, device=device),
        "margins": torch.tensor(margins, dtype=torch.float32, device=device),
    }


def comparison_loss(scores: torch.Tensor, terms: dict[str, torch.Tensor], centering_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over prompts of the mean pair loss of each prompt, and summed stats for the log."""
    r_b, r_w = scores[terms["better"]], scores[terms["worse"]]
    diff = r_b - r_w
    per_pair = -F.logsigmoid(diff - terms["margins"])
    if centering_coef:
        per_pair = per_pair + centering_coef * (r_b + r_w) ** 2
    loss_sum = (terms["weights"] * per_pair).sum()
    with torch.no_grad():
        correct = (diff > 0).float().sum() + 0.5 * (diff == 0).float().sum()
        stats = {
            "loss_sum": loss_sum.item(),
            "loss_count": float(terms["weights"].sum().round().item()),  # = prompts with pairs
            "accuracy_sum": correct.item(),
            "accuracy_count": float(diff.numel()),
            "margin_sum": diff.sum().item(),
            "margin_count": float(diff.numel()),
        }
    return loss_sum, stats


# ----------------------------------------------------------------------------- scoring


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _autocast(device: torch.device, precision: str | None, module: torch.nn.Module):
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
        with _autocast(device, precision, rm):
            scores = rm(**batch)
        for i, s in zip(idx, scores.tolist()):
            out[i] = s
    rm.train(was_training)
    return out


def normalise_scores(raw: Sequence[float], stats: dict | None) -> list[float]:
    stats = stats or {}
    mean, std = stats.get("mean", 0.0), stats.get("std", 1.0) or 1.0
    return [(r - mean) / std for r in raw]


def _settings(rm, max_length=None, max_prompt_share=None, precision=None):
    stats = getattr(rm, "stats", {}) or {}
    return (
        max_length or stats.get("max_length", 512),
        max_prompt_share or stats.get("max_prompt_share", 0.5),
        precision or stats.get("precision", "fp32"),
    )


@torch.no_grad()
def score(
    rm: RewardModel,
    tokenizer,
    messages_list: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 16,
    normalise: bool = True,
    *,
    max_length: int | None = None,
    max_prompt_share: float | None = None,
    precision: str | None = None,
) -> list[float]:
    """Scores of (prompt, response) pairs; normalised = (raw - stats["mean"]) / stats["std"].

    Length, truncation and precision default to those the model was trained with (rm.stats).
    """
    if len(messages_list) != len(responses):
        raise ValueError(f"{len(messages_list)} prompts for {len(responses)} responses")
    max_length, share, precision = _settings(rm, max_length, max_prompt_share, precision)
    rows = [encode_pair_text(tokenizer, m, r, max_length, share) for m, r in zip(messages_list, responses)]
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


# ----------------------------------------------------------------------------- evaluation


def comparison_metrics(comparisons: Sequence[Comparison], scores: Sequence[Sequence[float]], bins: int = 10) -> dict:
    """Pairwise accuracy (overall and per `source`), mean margin, calibration and the length baseline
    (the longer response, in characters, wins; ties count half), from raw scores."""
    if len(comparisons) != len(scores):
        raise ValueError("one list of scores per comparison")
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    confidences, hits = [], []
    prompt_acc, loss_sum, n_prompts = [], 0.0, 0
    for c, s in zip(comparisons, scores):
        pairs = c.pairs()
        if not pairs:
            continue
        correct_here, loss_here = 0.0, 0.0
        for b, w in pairs:
            m = s[b] - s[w]
            hit = 1.0 if m > 0 else 0.5 if m == 0 else 0.0
            lb, lw = len(c.responses[b]), len(c.responses[w])
            length_hit = 1.0 if lb > lw else 0.5 if lb == lw else 0.0
            for key in ("all", c.source or "(none)"):
                g = groups[key]
                g["pairs"] += 1
                g["correct"] += hit
                g["length_correct"] += length_hit
                g["margin"] += m
            correct_here += hit
            loss_here += max(-m, 0.0) + math.log1p(math.exp(-abs(m)))  # -log sigmoid(m), stably
            # Calibration on the model's own side: P(higher-scored response is the better one).
            confidences.append(1.0 / (1.0 + math.exp(-abs(m))))
            hits.append(hit)
        prompt_acc.append(correct_here / len(pairs))
        loss_sum += loss_here / len(pairs)
        n_prompts += 1

    def summary(g) -> dict:
        n = g["pairs"]
        return {
            "pairs": int(n),
            "accuracy": g["correct"] / n if n else float("nan"),
            "length_baseline_accuracy": g["length_correct"] / n if n else float("nan"),
            "mean_margin": g["margin"] / n if n else float("nan"),
        }

    overall = summary(groups["all"])
    by_source = {k: summary(g) for k, g in sorted(groups.items()) if k != "all"}
    table, ece = [], 0.0
    edges = [0.5 + 0.5 * i / bins for i in range(bins + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [i for i, p in enumerate(confidences) if lo <= p < hi or (hi == 1.0 and p == 1.0)]
        if not inside:
            table.append({"bin": [lo, hi], "count": 0, "predicted": None, "observed": None})
            continue
        pred = sum(confidences[i] for i in inside) / len(inside)
        obs = sum(hits[i] for i in inside) / len(inside)
        ece += len(inside) / len(confidences) * abs(pred - obs)
        table.append({"bin": [lo, hi], "count": len(inside), "predicted": pred, "observed": obs})
    return {
        "comparisons": n_prompts,
        **overall,
        "accuracy_per_prompt": sum(prompt_acc) / len(prompt_acc) if prompt_acc else float("nan"),
        "loss": loss_sum / n_prompts if n_prompts else float("nan"),
        "by_source": by_source,
        "calibration": table,
        "expected_calibration_error": ece if confidences else float("nan"),
        "calibration_note": "predicted = sigmoid(|margin|), the model's probability that its higher-scored response is "
        "the preferred one; observed = how often it is (ties count half)",
    }


@torch.no_grad()
def evaluate_reward_model(
    rm: RewardModel,
    tokenizer,
    comparisons: Sequence[Comparison],
    batch_size: int = 16,
    bins: int = 10,
    **settings,
) -> dict:
    """Score every response once and compute `comparison_metrics` (accuracy overall and per source,
    mean margin, calibration table, length baseline)."""
    scores = score_comparisons(rm, tokenizer, comparisons, batch_size, normalise=False, **settings)
    return comparison_metrics(comparisons, scores, bins)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalar part of `comparison_metrics`, per-source accuracies as `accuracy/<source>`."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for source, m in metrics.get("by_source", {}).items():
        out[f"accuracy/{source}"] = m["accuracy"]
        out[f"length_baseline_accuracy/{source}"] = m["length_baseline_accuracy"]
    return out


# ----------------------------------------------------------------------------- save / load


def save_reward_model(rm: RewardModel, tokenizer, out_dir: str | Path, stats: dict) -> Path:
    """Write the reward model folder (see the module docstring) atomically: everything goes into a
    temporary folder that is renamed at the end."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging = staging_root / out_dir.name
    try:
        save_model(rm.lm, tokenizer, staging, merge_lora=True)
        if hasattr(rm.lm, "peft_config"):  # keep the unmerged adapter, for PPO to put on a shared base
            rm.lm.save_pretrained(staging / ADAPTER_DIR, save_embedding_layers=False)
        head = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in rm.head.state_dict().items()}
        save_file(head, str(staging / HEAD_FILE))
        (staging / STATS_FILE).write_text(json.dumps(stats, indent=1, default=float))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    rm.stats = dict(stats)
    return out_dir


def reward_model_path(path: str | Path) -> Path:
    """A run folder stands for its final/ model."""
    path = Path(path)
    if (path / "final" / HEAD_FILE).exists():
        return path / "final"
    if not (path / HEAD_FILE).exists():
        raise FileNotFoundError(f"{path}: not a reward model folder (no {HEAD_FILE}); train one with `rlhfkit reward`")
    return path


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, object, dict]:
    """(reward model in eval mode, its tokenizer, reward_stats.json) from a folder written by
    `save_reward_model` (or a run folder whose final/ is one)."""
    path = reward_model_path(path)
    tokenizer = load_tokenizer(str(path))
    lm = load_causal_lm(str(path), tokenizer, dtype=dtype, dropout=False)
    weights = load_file(str(path / HEAD_FILE))
    head = torch.nn.Linear(weights["weight"].shape[1], 1)
    head.load_state_dict(weights)
    stats = json.loads((path / STATS_FILE).read_text())
    rm = RewardModel(lm, head.to(dtype), stats)
    rm.eval()
    return rm, tokenizer, stats


# ----------------------------------------------------------------------------- training


def _encode_all(tokenizer, comparisons, cfg: RewardConfig) -> tuple[list[EncodedComparison], int, int]:
    encoded = [encode_comparison(tokenizer, c, cfg.max_length, cfg.max_prompt_share, cfg.margin_scale) for c in comparisons]
    no_pairs = sum(1 for e in encoded if not e.pairs)
    encoded = [e for e in encoded if e.pairs]
    return encoded, sum(e.truncated for e in encoded), no_pairs


def reference_responses(cfg: RewardConfig, train: Sequence[Comparison]) -> tuple[list[tuple[list[dict], str]], str]:
    """(messages, response) pairs whose mean score is set to 0, and a description of where they came from."""
    if cfg.reference_data is not None:
        demos: list[Demonstration] = load_demonstrations(cfg.reference_data)
        train_prompts = {json.dumps(c.messages) for c in train}
        matching = [d for d in demos if json.dumps(d.messages) in train_prompts]
        if matching:
            chosen, what = matching, f"{len(matching)} demonstrations of training prompts from {cfg.reference_data}"
        else:
            log.warning("no reference demonstration has a training prompt; using all %d of %s", len(demos), cfg.reference_data)
            chosen, what = demos, f"all {len(demos)} demonstrations of {cfg.reference_data}"
        refs = [(d.messages, d.response) for d in chosen]
    else:
        refs = [(c.messages, c.responses[i]) for c in train for i in c.ranking[0]]
        what = f"best responses of the {len(train)} training comparisons"
    if len(refs) > cfg.max_reference_examples:
        refs = random.Random(cfg.seed).sample(refs, cfg.max_reference_examples)
        what += f" (sample of {cfg.max_reference_examples})"
    return refs, what


@torch.no_grad()
def normalise_reward_model(
    rm: RewardModel, tokenizer, refs: Sequence[tuple[list[dict], str]], cfg: RewardConfig, batch_size: int,
    spread: Sequence[tuple[list[dict], str]] = (),
) -> dict:
    """Shift the head bias so the reference responses score 0 on average; return mean (~0) and std.

    The std is measured over `spread` (all responses of the training comparisons, good and bad)
    when given: the references alone are often alike, and a tiny std would blow normalised
    scores (and PPO's rewards) up.
    """
    settings = dict(max_length=cfg.max_length, max_prompt_share=cfg.max_prompt_share, precision=cfg.precision)

    def raw_scores(pairs):
        return torch.tensor(
            score(rm, tokenizer, [m for m, _ in pairs], [r for _, r in pairs], batch_size, normalise=False, **settings),
            dtype=torch.float64,
        )

    raw = raw_scores(refs)
    shift = raw.mean().to(rm.head.bias.dtype)
    rm.head.bias -= shift
    after = raw - shift.double()  # the scores are affine in the bias: no second pass needed
    wide = raw_scores(spread) - shift.double() if spread else after
    std = wide.std(unbiased=False).item() if len(wide) > 1 else 1.0
    return {"mean": after.mean().item(), "std": std if std > 0 else 1.0, "raw_mean": raw.mean().item()}


def spread_responses(cfg: RewardConfig, train: Sequence[Comparison]) -> list[tuple[list[dict], str]]:
    """All responses of the training comparisons (a sample), for the std of the scores."""
    every = [(c.messages, r) for c in train for r in c.responses]
    if len(every) > cfg.max_reference_examples:
        every = random.Random(cfg.seed + 1).sample(every, cfg.max_reference_examples)
    return every


def run_reward(cfg: RewardConfig, stop_after: int | None = None) -> Path:
    """Train, normalise, evaluate and save; returns the final reward model folder. Resumes if interrupted."""
    run = RunDir(cfg.output_dir)
    if run.is_done():
        log.info("%s is complete; nothing to do", run.final)
        return run.final
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    if accelerator.is_main_process:
        save_run_config(cfg, run)

    base = model_path_of(cfg.model)  # an SFT run folder stands for its final model
    tokenizer = load_tokenizer(base)
    comparisons = load_comparisons(cfg.data, score_range=cfg.score_range)
    if cfg.eval_data is not None:
        train_cmp, eval_cmp = comparisons, load_comparisons(cfg.eval_data, score_range=cfg.score_range)
    else:
        train_cmp, eval_cmp = split_by_prompt(comparisons, cfg.eval_fraction, seed=cfg.seed)
    eval_cmp = eval_cmp[: cfg.max_eval_comparisons]
    train_enc, n_cut, n_empty = _encode_all(tokenizer, train_cmp, cfg)
    eval_enc, n_cut_eval, _ = _encode_all(tokenizer, eval_cmp, cfg)
    eval_cmp = [c for c in eval_cmp if c.pairs()]
    n_pairs = sum(len(e.pairs) for e in train_enc)
    log.info(
        "reward data: %d train comparisons (%d pairs, %d rows) / %d eval comparisons; %d train and %d eval rows "
        "truncated to %d tokens%s",
        len(train_enc), n_pairs, sum(len(e.rows) for e in train_enc), len(eval_enc), n_cut, n_cut_eval, cfg.max_length,
        f"; {n_empty} comparisons without a strict pair left out" if n_empty else "",
    )  # fmt: skip
    if not train_enc:
        raise ValueError(f"{cfg.data}: no training comparisons with a strict pair")

    # One comparison (one prompt) is one item of weight 1: the loop divides the summed per-prompt
    # losses by the number of prompts in the global batch, so every prompt weighs the same.
    plan = DataPlan(
        items=train_enc,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        seed=cfg.seed,
        weight=lambda c: 1.0,
        length=(lambda c: max(len(r) for r in c.rows)) if cfg.group_by_length else None,  # rows pad to the longest
    )
    rm = build_reward_model(base, tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(rm.lm)
    trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    log.info("reward model: %s, %.1fM of %.1fM parameters trained", base, trainable / 1e6, sum(p.numel() for p in rm.parameters()) / 1e6)
    optimizer = make_optimizer(rm, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps_for(plan, cfg))
    wrapped, optimizer, scheduler = accelerator.prepare(rm, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id

    def loss_fn(module, micro: list[EncodedComparison]):
        rows = [r for e in micro for r in e.rows]
        batch = rows_to_batch(rows, pad_id, device=accelerator.device)
        scores = module(**batch)
        loss_sum, stats = comparison_loss(scores, pair_terms(micro, accelerator.device), cfg.centering_coef)
        stats["tokens"] = float(batch["attention_mask"].sum().item())
        stats["pairs"] = float(sum(len(e.pairs) for e in micro))
        return loss_sum, stats

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        wrapped.eval()
        idx = list(range(accelerator.process_index, len(eval_enc), accelerator.num_processes))
        rows = [r for i in idx for r in eval_enc[i].rows]
        flat = score_rows(wrapped, rows, pad_id, cfg.batch_size * 2, cfg.precision) if rows else []
        mine, k = {}, 0
        for i in idx:
            n = len(eval_enc[i].rows)
            mine[i] = flat[k : k + n]
            k += n
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([mine])
            mine = {i: s for part in gathered for i, s in part.items()}
        # Rows are distinct responses; map back to response order for the metrics.
        scores = [_response_scores(eval_cmp[i], mine[i]) for i in range(len(eval_enc))]
        out = flat_metrics(comparison_metrics(eval_cmp, scores, cfg.eval_bins)) if eval_enc else {}
        if accelerator.is_main_process and out:
            log.info(
                "eval loss %.4f  accuracy %.3f  (length baseline %.3f)  mean margin %.3f",
                out["loss"], out["accuracy"], out["length_baseline_accuracy"], out["mean_margin"],
            )  # fmt: skip
        wrapped.train()
        return out

    result = train_supervised(
        cfg=cfg,
        accelerator=accelerator,
        model=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        plan=plan,
        loss_fn=loss_fn,
        evaluate=evaluate,
        run=run,
        desc="reward",
        stop_after=stop_after,
    )
    if not result.finished:  # stopped early (tests simulate a crash this way)
        return run.path
    if accelerator.is_main_process:
        trained: RewardModel = accelerator.unwrap_model(wrapped)
        trained.eval()
        refs, what = reference_responses(cfg, train_cmp)
        norm = normalise_reward_model(trained, tokenizer, refs, cfg, cfg.batch_size * 2, spread_responses(cfg, train_cmp))
        log.info("normalised on %s: raw mean %.4f -> %.2e, std %.4f", what, norm["raw_mean"], norm["mean"], norm["std"])
        stats = {
            **norm,
            "base_model": cfg.model,
            "base_model_path": resolve_model(base),
            "lora": cfg.lora.enabled,
            "max_length": cfg.max_length,
            "max_prompt_share": cfg.max_prompt_share,
            "precision": cfg.precision,
            "reference": what,
            "train_comparisons": len(train_enc),
            "train_pairs": n_pairs,
            "steps": result.steps,
            "eval": result.evals[-1] if result.evals else {},
        }
        save_reward_model(trained, tokenizer, run.final, stats)
        if result.evals and result.evals[0]:
            log.info("eval accuracy: first %.3f -> last %.3f", result.evals[0]["accuracy"], result.evals[-1]["accuracy"])
    accelerator.wait_for_everyone()
    return run.final


# ----------------------------------------------------------------------------- commands: score, reward-eval


def _input_kind(spec: str) -> str:
    """'comparisons' or 'demonstrations', from the format prefix or the first record's keys."""
    from .data import parse_spec

    fmt, path = parse_spec(spec)
    if fmt != "jsonl":
        return "demonstrations" if fmt == "self-instruct" else "comparisons"
    from .data import _jsonl_rows

    for _, obj in _jsonl_rows(path):
        keys = set(obj) if isinstance(obj, dict) else set()
        return "comparisons" if keys & {"chosen", "rejected", "responses", "ranking", "score"} else "demonstrations"
    return "comparisons"


def run_score(reward_model: str, spec: str, output: str, batch_size: int = 16, normalise: bool = True) -> Path:
    """Score a file: comparisons get one line each with the scores of their responses (`rewards`, in
    response order); demonstration-like {prompt, response} records get one line each (`reward`)."""
    from .data import comparison_to_json, demonstration_to_json, load_demonstrations, write_jsonl

    rm, tokenizer, _ = load_reward_model(reward_model)
    field = "rewards" if normalise else "raw_rewards"
    if _input_kind(spec) == "comparisons":
        comparisons = load_comparisons(spec, score_range=None)
        scores = score_comparisons(rm, tokenizer, comparisons, batch_size, normalise=normalise)
        records = [{**comparison_to_json(c), field: s} for c, s in zip(comparisons, scores)]
    else:
        demos = load_demonstrations(spec)
        scores = score(rm, tokenizer, [d.messages for d in demos], [d.response for d in demos], batch_size, normalise)
        records = [{**demonstration_to_json(d), field[:-1]: s} for d, s in zip(demos, scores)]
    write_jsonl(output, records)
    return Path(output)


def run_reward_eval(reward_model: str, spec: str, output: str | None = None, batch_size: int = 16, max_comparisons: int = 0, bins: int = 10) -> dict:
    rm, tokenizer, stats = load_reward_model(reward_model)
    comparisons = load_comparisons(spec, score_range=None)
    if max_comparisons:
        comparisons = comparisons[:max_comparisons]
    metrics = {"reward_model": str(reward_model_path(reward_model)), "data": spec, **evaluate_reward_model(rm, tokenizer, comparisons, batch_size, bins)}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=1))
    return metrics


def print_evaluation(metrics: dict) -> None:
    """Accuracy per subset next to the length baseline, then the calibration table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"reward model accuracy on {metrics.get('data', 'comparisons')}")
    for col in ("subset", "pairs", "accuracy", "length baseline", "mean margin"):
        table.add_column(col, justify="left" if col == "subset" else "right")

    def row(name, m, style=None):
        table.add_row(name, str(m["pairs"]), f"{m['accuracy']:.3f}", f"{m['length_baseline_accuracy']:.3f}", f"{m['mean_margin']:.3f}", style=style)

    for name, m in metrics["by_source"].items():
        row(name, m)
    row("all", metrics, style="bold")
    console.print(table)
    cal = Table(title=f"calibration: P(higher-scored wins) = sigmoid(|margin|); ECE {metrics['expected_calibration_error']:.3f}")
    for col in ("predicted bin", "pairs", "mean predicted", "observed"):
        cal.add_column(col, justify="right")
    for b in metrics["calibration"]:
        if b["count"]:
            cal.add_row(f"{b['bin'][0]:.2f}-{b['bin'][1]:.2f}", str(b["count"]), f"{b['predicted']:.3f}", f"{b['observed']:.3f}")
    console.print(cal)


def _response_scores(c: Comparison, row_scores: list[float]) -> list[float]:
    """Scores per response of `c` from the scores of its distinct-response rows."""
    row_of: dict[str, int] = {}
    for r in c.responses:
        row_of.setdefault(r, len(row_of))
    return [row_scores[row_of[r]] for r in c.responses]


__all__ = [
    "EncodedComparison",
    "RewardModel",
    "build_reward_model",
    "comparison_loss",
    "comparison_metrics",
    "encode_comparison",
    "encode_pair_text",
    "evaluate_reward_model",
    "expand_comparison",
    "last_token_index",
    "load_reward_model",
    "run_reward",
    "run_reward_eval",
    "run_score",
    "save_reward_model",
    "score",
    "score_comparisons",
    "score_rows",
]
