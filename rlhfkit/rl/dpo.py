"""`rlhfkit dpo`: Direct Preference Optimization (Rafailov et al. 2023), or IPO (Azar et al. 2023), on comparisons.

Read top to bottom, as the paper goes:

1. **Data.** The comparisons the reward model trains on (pairs, K-wise rankings, ratings; any format of the data
   package), split by prompt like the reward step. Each prompt's ranking gives its strict (better, worse) pairs,
   weighted 1/pairs so that every prompt weighs the same (`reward.expand_comparison`, the reward model's weights).
   Each distinct response is one row: the chat-templated prompt (masked) + the response + EOS (the SFT layout).
2. **The reference** pi_ref is the SFT policy. The summed log-prob of every row under it is computed once, before
   training (for the comparisons the run will visit: all of them after one epoch), and kept in
   `reference_logps.safetensors`; a resumed run reloads it (or, if it is gone, recomputes it:
   the reference never changes). With LoRA the reference is the policy with its adapter switched off, so one base
   network sits in memory; without LoRA a frozen SFT copy is loaded for that pass only and freed.
3. **The loss** (`preference_math`): per pair, h = log pi - log pi_ref of each side, then -log sigmoid(beta (h_w - h_l))
   (DPO) or (h_w - h_l - 1/(2 beta))^2 (IPO), summed with the pair weights; the shared loop of SFT and the reward
   model (`training.train_supervised`: accumulation, processes, checkpoints, resume, NaN guard, metrics) divides by
   the number of prompts in the global batch.
4. **Held-out**: the implicit reward beta * (log pi - log pi_ref) of every held-out response, read as a reward
   model's score: pairwise accuracy beside the longer-response baseline, per source, margin, calibration
   (`reward.comparison_metrics`, the reward model's own measure), logged and written to `heldout_accuracy.json`.
5. **Save** `final/` like SFT: loads with `AutoModelForCausalLM.from_pretrained` (LoRA merged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import DPOConfig
from ..data import Comparison, load_comparisons, split_by_prompt
from ..distributed import even_share, full_model, wrap_blocks
from ..generate import model_path_of
from ..models import backbone_and_head, enable_activation_checkpointing, load_causal_lm, load_tokenizer, save_model
from ..reward import comparison_metrics, expand_comparison, flat_metrics, response_scores
from ..tokens import IGNORE_INDEX, Example, collate, encode_prompt, encode_response, truncate
from ..training import (
    DataPlan,
    RunDir,
    make_optimizer,
    make_scheduler,
    start_run,
    total_steps_for,
    train_supervised,
)
from .preference_math import implicit_reward, pair_statistics, preference_loss, sequence_logprobs

log = logging.getLogger("rlhfkit.dpo")

REFERENCE_FILE = "reference_logps.safetensors"
ACCURACY_FILE = "heldout_accuracy.json"


# ----------------------------------------------------------------------------- 1. data


@dataclass
class PreferenceItem:
    """One prompt's comparison, ready to train on: one row per distinct response, its strict pairs as row indices
    and their weights (1/pairs: they sum to 1). `index` is its place in its split: the key of the reference cache."""

    index: int
    rows: list[Example]
    pairs: list[tuple[int, int]]  # (better row, worse row)
    weights: list[float]
    truncated: int = 0


def encode_preferences(tokenizer, comparisons: Sequence[Comparison], cfg: DPOConfig) -> tuple[list[PreferenceItem], list[Comparison]]:
    """Items for the comparisons that have a strict pair (and those comparisons, in the same order)."""
    items, kept = [], []
    for c in comparisons:
        pairs, weights, _ = expand_comparison(c)
        if not pairs:
            continue
        prompt = encode_prompt(tokenizer, c.messages)
        row_of: dict[str, int] = {}  # distinct responses in first-seen order, as `reward.response_scores` expects
        rows, truncated = [], 0
        for response in c.responses:
            if response not in row_of:
                p, r, cut = truncate(prompt, encode_response(tokenizer, response), cfg.max_length, cfg.max_prompt_share)
                rows.append(Example(p + r, [IGNORE_INDEX] * len(p) + r, len(p), cut))
                row_of[response] = len(rows) - 1
                truncated += cut
        index = [row_of[r] for r in c.responses]
        items.append(PreferenceItem(len(items), rows, [(index[b], index[w]) for b, w in pairs], weights, truncated))
        kept.append(c)
    return items, kept


def load_preferences(cfg: DPOConfig, tokenizer):
    """(train items, eval items, eval comparisons): read, split by prompt as the reward step does, tokenise."""
    comparisons = load_comparisons(cfg.data, score_range=cfg.score_range)
    if cfg.eval_data is not None:
        train_cmp, eval_cmp = comparisons, load_comparisons(cfg.eval_data, score_range=cfg.score_range)
    else:
        train_cmp, eval_cmp = split_by_prompt(comparisons, cfg.eval_fraction, seed=cfg.seed)
    train, _ = encode_preferences(tokenizer, train_cmp, cfg)
    held, eval_cmp = encode_preferences(tokenizer, eval_cmp[: cfg.max_eval_comparisons], cfg)
    log.info(
        "DPO data: %d train comparisons (%d pairs, %d rows, %d truncated to %d tokens) / %d held-out comparisons",
        len(train), sum(len(i.pairs) for i in train), sum(len(i.rows) for i in train), sum(i.truncated for i in train),
        cfg.max_length, len(held),
    )  # fmt: skip
    if not train:
        raise ValueError(f"{cfg.data}: no training comparisons with a strict pair")
    return train, held, eval_cmp


# ----------------------------------------------------------------------------- log-probs of responses


class ResponseLogprobs(torch.nn.Module):
    """Wraps a causal LM; forward returns log pi(response | prompt) per row, summed over the response tokens.

    The LM head runs only on the positions that predict response tokens (gathered into a right-padded
    (rows, longest response, hidden) block), so a long prompt costs no vocabulary-sized logits. A module (not a
    function) so that DDP sees an ordinary forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask):
        backbone, head = backbone_and_head(self.model)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # position t predicts token t+1
        trained = targets != IGNORE_INDEX
        n = trained.sum(1)
        # For row b, the k-th response position: its index in the row (padding slots point at position 0, masked).
        mask = torch.arange(int(n.max()), device=n.device)[None] < n[:, None]
        where = torch.zeros_like(mask, dtype=torch.long)
        where[mask] = trained.nonzero()[:, 1]
        picked = hidden[:, :-1].gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
        tokens = targets.gather(1, where)  # -100 on the padding slots: masked
        return sequence_logprobs(head(picked), tokens, mask)


def batch_of(rows: list[Example], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}


@torch.no_grad()
def logprobs_of(module: torch.nn.Module, items: Sequence[PreferenceItem], pad_id: int, batch_size: int, accelerator) -> list[torch.Tensor]:
    """Per item, the summed log-prob of each of its rows (fp32, on the CPU)."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        with accelerator.autocast():
            flat = module(**batch_of([r for it in chunk for r in it.rows], pad_id, accelerator.device)).float().cpu()
        out.extend(flat.split([len(it.rows) for it in chunk]))
    return out


# ----------------------------------------------------------------------------- 2. the reference, computed once


def items_seen(plan: DataPlan, total_steps: int) -> set[int]:
    """Indices of the training items that steps 0..total_steps-1 visit, on any process (the plan is a pure function of
    seed and step): a run of max_steps shorter than an epoch needs the reference of those comparisons only."""
    seen = set()
    for p in range(plan.num_processes):
        replica = dataclasses.replace(plan, process_index=p)
        for step in range(total_steps):
            seen.update(item.index for micro in replica.step(step).micro_batches for item in micro)
    return seen


def fingerprint(cfg: DPOConfig, splits: dict[str, list[PreferenceItem]], needed: dict[str, set[int]]) -> str:
    """What the cached reference log-probs depend on: the reference model, the precision, every row's tokens and
    which items were computed."""
    h = hashlib.sha256(f"{model_path_of(cfg.model)}|{cfg.precision}".encode())
    for name, items in splits.items():
        h.update(json.dumps([name, sorted(needed[name])]).encode())
        for item in items:
            for row in item.rows:
                h.update(json.dumps([row.prompt_length, row.input_ids]).encode())
    return h.hexdigest()


def reference_logprobs(
    cfg: DPOConfig, policy, tokenizer, splits: dict[str, list[PreferenceItem]], needed: dict[str, set[int]], run: RunDir, accelerator
) -> dict[str, list[torch.Tensor]]:
    """log pi_ref of every row of the `needed` items of each split (NaN for the others, which nothing reads): read
    from the run folder, or computed (and saved there) once."""
    from safetensors.torch import load_file, save_file

    path = run.path / REFERENCE_FILE
    stamp = fingerprint(cfg, splits, needed)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved = f.metadata().get("fingerprint")
        if saved == stamp:
            flat = load_file(str(path))
            log.info("reference log-probs read from %s", path)
            return {name: list(flat[name].split([len(i.rows) for i in items])) for name, items in splits.items()}
        log.warning("%s was made from other data or another reference; computing it again", path)

    def compute(model) -> dict[str, list[torch.Tensor]]:
        out = {}
        for name, items in splits.items():
            todo = [item for item in items if item.index in needed[name]]
            done = dict(zip((item.index for item in todo), logprobs_of(ResponseLogprobs(model), todo, tokenizer.pad_token_id, cfg.batch_size, accelerator)))
            out[name] = [done.get(item.index, torch.full((len(item.rows),), float("nan"))) for item in items]
        return out

    if cfg.lora.enabled:  # the SFT policy is the policy's base with the adapter off: no second network
        with policy.disable_adapter():
            ref = compute(policy)
    else:  # a frozen SFT copy, for this one pass
        sft = load_causal_lm(model_path_of(cfg.model), tokenizer).to(accelerator.device).eval()
        ref = compute(sft)
        del sft
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        flat = {name: torch.cat(v) if v else torch.zeros(0) for name, v in ref.items()}
        save_file(flat, str(tmp), metadata={"fingerprint": stamp})
        tmp.replace(path)
    accelerator.wait_for_everyone()
    rows = sum(int(torch.isfinite(t).sum()) for v in ref.values() for t in v)
    log.info("reference log-probs of %d rows (the comparisons this run sees) computed and saved to %s", rows, path)
    return ref


# ----------------------------------------------------------------------------- 3. the loss


def pair_indices(micro: Sequence[PreferenceItem], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(better rows, worse rows, weights) as indices into the concatenated rows of `micro`."""
    better, worse, weights, offset = [], [], [], 0
    for item in micro:
        better += [offset + b for b, _ in item.pairs]
        worse += [offset + w for _, w in item.pairs]
        weights += item.weights
        offset += len(item.rows)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_long(better), as_long(worse), torch.tensor(weights, dtype=torch.float32, device=device)


def dpo_batch_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, micro: Sequence[PreferenceItem], cfg: DPOConfig):
    """Sum over the prompts of `micro` of their weighted pair losses, and summed stats for the log."""
    better, worse, weights = pair_indices(micro, policy_logps.device)
    ref = reference_logps.to(policy_logps.device)
    losses = preference_loss(policy_logps[better], policy_logps[worse], ref[better], ref[worse], cfg.beta, cfg.loss, cfg.label_smoothing)
    loss_sum = (weights * losses).sum()
    rewards = implicit_reward(policy_logps.detach(), ref, cfg.beta)
    stats = pair_statistics(rewards[better], rewards[worse])
    stats.update(loss_sum=loss_sum.item(), loss_count=float(len(micro)))
    return loss_sum, stats


# ----------------------------------------------------------------------------- the step


def run_dpo(cfg: DPOConfig, stop_after: int | None = None) -> Path:
    """Train, evaluate and save; returns the folder of the final model. Resumes if interrupted."""
    run, accelerator = start_run(cfg)
    if accelerator is None:
        return run.final
    tokenizer = load_tokenizer(model_path_of(cfg.model))
    pad_id = tokenizer.pad_token_id

    # 1. the comparisons, expanded into weighted pairs
    train_items, eval_items, eval_cmp = load_preferences(cfg, tokenizer)
    plan = DataPlan(
        items=train_items, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, seed=cfg.seed, weight=lambda item: 1.0,  # every prompt weighs the same
        length=(lambda item: max(len(r) for r in item.rows)) if cfg.group_by_length else None,
    )  # fmt: skip

    # 2. the policy starts from SFT; the reference log-probs are computed once
    policy = load_causal_lm(model_path_of(cfg.model), tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers).to(accelerator.device)
    splits = {"train": train_items, "eval": eval_items}
    needed = {"train": items_seen(plan, total_steps_for(plan, cfg)), "eval": {item.index for item in eval_items}}
    reference = reference_logprobs(cfg, policy, tokenizer, splits, needed, run, accelerator)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    wrapped = ResponseLogprobs(policy)
    optimizer = make_optimizer(wrapped, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps_for(plan, cfg))
    wrap_blocks(accelerator, wrapped)  # FSDP2 only: one shard unit per transformer block (the reference pass ran before, whole)
    wrapped, optimizer, scheduler = accelerator.prepare(wrapped, optimizer, scheduler)

    # 3. the loss of one micro-batch of prompts
    def loss_fn(module, micro: list[PreferenceItem]):
        rows = [r for item in micro for r in item.rows]
        logps = module(**batch_of(rows, pad_id, accelerator.device))
        loss_sum, stats = dpo_batch_loss(logps, torch.cat([reference["train"][item.index] for item in micro]), micro, cfg)
        stats["tokens"] = float(sum(len(r) for r in rows))
        return loss_sum, stats

    # 4. the implicit reward on held-out comparisons, measured like a reward model
    heldout: dict = {}

    def evaluate() -> dict[str, float]:
        nonlocal heldout
        if not eval_items:
            return {}
        wrapped.eval()
        # under FSDP every process runs equally many forward passes: the padding's results are dropped
        mine, real = even_share(range(len(eval_items)), accelerator, cfg.batch_size)
        logps = logprobs_of(wrapped, [eval_items[i] for i in mine], pad_id, cfg.batch_size, accelerator)[:real]
        rewards = {i: implicit_reward(lp, reference["eval"][i], cfg.beta).tolist() for i, lp in zip(mine[:real], logps)}
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rewards = {i: r for part in gather_object([rewards]) for i, r in part.items()}
        scores = [response_scores(c, rewards[i]) for i, c in enumerate(eval_cmp)]
        heldout = comparison_metrics(eval_cmp, scores, cfg.eval_bins)
        wrapped.train()
        if accelerator.is_main_process:
            log.info("held-out implicit-reward accuracy %.3f (longer-response baseline %.3f), mean margin %.3f",
                     heldout["accuracy"], heldout["length_baseline_accuracy"], heldout["mean_margin"])  # fmt: skip
        return flat_metrics(heldout)

    result = train_supervised(
        cfg=cfg, accelerator=accelerator, model=wrapped, optimizer=optimizer, scheduler=scheduler, plan=plan,
        loss_fn=loss_fn, evaluate=evaluate, run=run, desc=cfg.loss, stop_after=stop_after,
    )  # fmt: skip
    if not result.finished:  # stopped early (tests simulate a crash this way)
        return run.path

    # 5. save like SFT, with the held-out accuracy beside it (under FSDP2 gathered whole on the main process first)
    rebuild = lambda: ResponseLogprobs(load_causal_lm(model_path_of(cfg.model), tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers))  # noqa: E731
    trained = full_model(accelerator, wrapped, rebuild)
    if accelerator.is_main_process:
        what = {"data": cfg.eval_data if cfg.eval_data is not None else f"{cfg.eval_fraction:.0%} of the prompts of {cfg.data} (seed {cfg.seed})",
                "measure": "implicit reward beta * (log pi - log pi_ref) as a reward model's score", "beta": cfg.beta, "objective": cfg.loss}  # fmt: skip
        (run.path / ACCURACY_FILE).write_text(json.dumps({**what, **heldout}, indent=1, default=str))
        save_model(trained.model, tokenizer, run.final, merge_lora=cfg.lora.merge_on_save)
    accelerator.wait_for_everyone()
    return run.final


__all__ = ["ACCURACY_FILE", "REFERENCE_FILE", "PreferenceItem", "ResponseLogprobs", "dpo_batch_loss", "encode_preferences", "run_dpo"]
