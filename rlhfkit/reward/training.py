"""`rlhfkit reward`: train a reward model on comparisons, measure its normalisation, save it.

One comparison (one prompt, K responses) is one item of the data plan and K forward rows: each
response is encoded once, and all pairs of a prompt are in one batch (`loss.comparison_loss`).
After training, the normalisation is measured (`normalisation_stats`) and saved with the model in
the standard format (`folder.save_reward_model`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import RewardConfig
from ..data import Comparison, Demonstration, Rows, load_demonstrations, record_from_row, split_rows
from ..distributed import even_batches, full_model, uses_fsdp, wrap_blocks
from ..generate import model_path_of
from ..models import (
    enable_activation_checkpointing,
    load_tokenizer,
    resolve_model,
    store_frozen_linear_weights_as,
    transformer_blocks,
)
from ..training import (
    DataPlan,
    make_optimizer,
    make_scheduler,
    start_run,
    total_steps_for,
    train_supervised,
)
from .encoding import (
    EncodedComparison,
    comparison_dataset,
    comparisons_batch,
    encode_comparison,
    encoded_from_row,
    response_scores,
)
from .evaluation import comparison_metrics, flat_metrics
from .folder import save_reward_model
from .frozen_features import FrozenFeatureCache, cache_size_bytes, cache_tokens
from .loss import comparison_loss, pair_terms
from .model import LAYOUT_EOS, RewardModel, build_reward_model
from .scoring import score, score_rows

log = logging.getLogger("rlhfkit.reward")


def _encode_all(tokenizer, comparisons, cfg: RewardConfig, share_prompt: bool = False) -> tuple[list[EncodedComparison], int, int]:
    encoded = [encode_comparison(tokenizer, c, cfg.max_length, cfg.max_prompt_share, cfg.margin_scale, share_prompt) for c in comparisons]
    no_pairs = sum(1 for e in encoded if not e.pairs)
    encoded = [e for e in encoded if e.pairs]
    return encoded, sum(e.truncated for e in encoded), no_pairs


def comparison_lengths(items: Sequence[EncodedComparison], packed: bool = False):
    """What a batch pads each comparison to: its longest row, or with `packed` its packed row; from the dataset's
    columns, or one pass over a list."""
    if not isinstance(items, Rows):
        return [c.packed_tokens if packed else max(len(r) for r in c.rows) for c in items]
    if not packed:
        return items.column("length")
    return items.column("tokens") - (items.column("n_rows") - 1) * items.column("prompt_tokens")


@dataclass
class RewardData:
    """What the reward step trains and evaluates on. `train` (the training comparisons with a strict pair)
    and `train_comparisons` (all of them, for the normalisation) may be `data.Rows`, read from disk an item
    at a time; the eval comparisons (at most max_eval_comparisons, those with a strict pair) are lists."""

    train: Sequence[EncodedComparison]
    train_comparisons: Sequence[Comparison]
    eval_comparisons: list[Comparison]
    eval_encoded: list[EncodedComparison]
    n_pairs: int


def load_reward_data(cfg: RewardConfig, tokenizer) -> RewardData:
    """Read, split (by prompt) and encode the comparisons. The records are streamed into arrow files in the run
    folder's data/, encoded by `Dataset.map` and memory-mapped (a resumed run reuses them), so a large set never
    sits in Python lists. `load_comparisons` + `split_by_prompt` + `_encode_all` give the same items as lists."""

    def dataset(spec, share_prompt: bool = False):
        return comparison_dataset(
            spec, tokenizer, max_length=cfg.max_length, max_prompt_share=cfg.max_prompt_share, margin_scale=cfg.margin_scale,
            score_range=cfg.score_range, cache_dir=Path(cfg.output_dir) / "data", share_prompt=share_prompt,
        )  # fmt: skip

    def comparison_from_row(row: dict) -> Comparison:
        return record_from_row(row, "comparisons")

    # Training rows may share their prompt (`share_prompt`); held-out rows are each truncated on their own, as a
    # reward model reads one (prompt, response) when it scores.
    records, encoded = dataset(cfg.data, cfg.share_prompt)
    if cfg.eval_data is not None:
        eval_records, eval_encoded = dataset(cfg.eval_data)
        train_rows, eval_rows = np.arange(len(encoded)), np.arange(len(eval_encoded))
    else:
        eval_records, eval_encoded = records, dataset(cfg.data)[1] if cfg.share_prompt else encoded
        train_rows, eval_rows = split_rows(encoded, cfg.eval_fraction, seed=cfg.seed)
    all_train = Rows(encoded, encoded_from_row, train_rows)
    pairs = all_train.column("n_pairs")
    train, n_empty = all_train.subset(np.flatnonzero(pairs > 0)), int((pairs == 0).sum())
    if cfg.max_train_comparisons is not None and len(train) > cfg.max_train_comparisons:
        train = train.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(train), cfg.max_train_comparisons, replace=False)))
    pairs = train.column("n_pairs")
    eval_rows = eval_rows[: cfg.max_eval_comparisons]
    eval_rows = eval_rows[Rows(eval_encoded, encoded_from_row, eval_rows).column("n_pairs") > 0]
    eval_enc = list(Rows(eval_encoded, encoded_from_row, eval_rows))
    n_cut, n_cut_eval = int(train.column("truncated").sum()), sum(e.truncated for e in eval_enc)
    log.info(
        "reward data: %d train comparisons (%d pairs, %d rows) / %d eval comparisons; %d train and %d eval rows "
        "truncated to %d tokens%s",
        len(train), int(pairs.sum()), int(train.column("n_rows").sum()), len(eval_enc), n_cut, n_cut_eval, cfg.max_length,
        f"; {n_empty} comparisons without a strict pair left out" if n_empty else "",
    )  # fmt: skip
    if not len(train):
        raise ValueError(f"{cfg.data}: no training comparisons with a strict pair")
    return RewardData(
        train=train,
        train_comparisons=Rows(records, comparison_from_row, train_rows),
        eval_comparisons=list(Rows(eval_records, comparison_from_row, eval_rows)),
        eval_encoded=eval_enc,
        n_pairs=int(pairs.sum()),
    )


def _sample_flat(items: Sequence, parts: Callable[[Any], list], limit: int, seed: int) -> tuple[list, bool]:
    """([x for item in items for x in parts(item)], False), or (a `random.Random(seed).sample` of `limit` of them,
    True): the same sample as of the whole list, without making the whole list (`items` may be read from disk)."""
    counts = np.fromiter((len(parts(item)) for item in items), dtype=np.int64, count=len(items))
    total = int(counts.sum())
    if total <= limit:
        return [x for item in items for x in parts(item)], False
    starts = np.cumsum(counts) - counts
    picks = random.Random(seed).sample(range(total), limit)  # random.sample picks by position only
    items_of = np.searchsorted(starts, picks, side="right") - 1
    return [parts(items[int(i)])[j - int(starts[i])] for i, j in zip(items_of, picks)], True


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
        items, parts = [(d.messages, d.response) for d in chosen], lambda ref: [ref]
    else:
        items, parts, what = train, _best_responses, f"best responses of the {len(train)} training comparisons"
    refs, sampled = _sample_flat(items, parts, cfg.max_reference_examples, cfg.seed)
    if sampled:
        what += f" (sample of {cfg.max_reference_examples})"
    return refs, what


def _best_responses(c: Comparison) -> list[tuple[list[dict], str]]:
    return [(c.messages, c.responses[i]) for i in c.ranking[0]]


@torch.no_grad()
def normalisation_stats(
    rm: RewardModel, tokenizer, refs: Sequence[tuple[list[dict], str]], cfg: RewardConfig, batch_size: int,
    spread: Sequence[tuple[list[dict], str]] = (),
) -> dict:
    """The normalisation saved with the model: `mean` = the mean raw score of the reference responses (they
    score 0 once normalised), `std` = the standard deviation of the raw scores over `spread` (all responses
    of the training comparisons, good and bad) when given: the references alone are often alike, and a
    tiny std would blow normalised scores (and PPO's rewards) up. The weights are not changed: the
    standard head has no bias, and plain transformers gives the raw score."""
    settings = dict(max_length=cfg.max_length, max_prompt_share=cfg.max_prompt_share, precision=cfg.precision)

    def raw_scores(pairs):
        return torch.tensor(
            score(rm, tokenizer, [m for m, _ in pairs], [r for _, r in pairs], batch_size, normalise=False, **settings),
            dtype=torch.float64,
        )

    raw = raw_scores(refs)
    wide = raw_scores(spread) if spread else raw
    std = wide.std(unbiased=False).item() if len(wide) > 1 else 1.0
    return {"mean": raw.mean().item(), "std": std if std > 0 else 1.0}


def spread_responses(cfg: RewardConfig, train: Sequence[Comparison]) -> list[tuple[list[dict], str]]:
    """All responses of the training comparisons (a sample), for the std of the scores."""
    return _sample_flat(train, lambda c: [(c.messages, r) for r in c.responses], cfg.max_reference_examples, cfg.seed + 1)[0]


def run_reward(cfg: RewardConfig, stop_after: int | None = None) -> Path:
    """Train, normalise, evaluate and save; returns the final reward model folder. Resumes if interrupted."""
    run, accelerator = start_run(cfg)
    if accelerator is None:
        return run.final

    base = model_path_of(cfg.model)  # an SFT run folder stands for its final model
    tokenizer = load_tokenizer(base)
    with accelerator.main_process_first():  # the main process writes the data files, the others read them
        data = load_reward_data(cfg, tokenizer)
    train_enc, train_cmp, n_pairs = data.train, data.train_comparisons, data.n_pairs
    eval_cmp, eval_enc = data.eval_comparisons, data.eval_encoded

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
        lengths=comparison_lengths(train_enc, cfg.share_prompt) if cfg.group_by_length else None,  # rows pad to the longest
    )
    rm = build_reward_model(base, tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(rm.lm)
    if cfg.precision == "bf16" and not uses_fsdp(accelerator):  # (FSDP2 shards a block's weights in one dtype)
        # The frozen blocks' matrices in bf16, the precision autocast multiplies them in: the same scores,
        # without a cast per forward, in half their memory. They are saved as they were used (upcast, below).
        store_frozen_linear_weights_as(rm.lm, torch.bfloat16)
    trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    log.info("reward model: %s, %.1fM of %.1fM parameters trained", base, trainable / 1e6, sum(p.numel() for p in rm.parameters()) / 1e6)
    optimizer = make_optimizer(rm, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps_for(plan, cfg))
    wrap_blocks(accelerator, rm)  # FSDP2 only: one shard unit per transformer block
    wrapped, optimizer, scheduler = accelerator.prepare(rm, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id
    cache = None
    if cfg.cache_frozen_features and cfg.train_top_layers and uses_fsdp(accelerator):
        # The cache runs the lower blocks only for rows not seen yet: a different number of forward passes
        # on each process, while every FSDP2 forward is a collective all of them must join.
        log.info("frozen-feature cache off under FSDP: each block's forward is a collective of all processes")
    elif cfg.cache_frozen_features and cfg.train_top_layers:
        size = cache_size_bytes(plan.items, rm.lm.config.hidden_size, packed=cfg.share_prompt)
        cache = FrozenFeatureCache(len(transformer_blocks(rm.lm)) - cfg.train_top_layers, cache_tokens(plan.items, cfg.share_prompt), packed=cfg.share_prompt)
        log.info("frozen-feature cache: the output of the lower %d blocks, about %.2f GB once every row is seen", cache.split, size / 1e9)
    eval_mine = [eval_enc[i] for i in range(accelerator.process_index, len(eval_enc), accelerator.num_processes)]
    eval_cache = None  # the held-out rows' frozen features: every evaluation after the first runs the top blocks only
    # (worth its memory only if the held-out rows are scored more than once: a single evaluation at the end runs them once anyway)
    evaluated_again = cfg.eval_at_start or 0 < cfg.eval_every < total_steps_for(plan, cfg)
    if cfg.cache_eval_features and cfg.train_top_layers and eval_mine and evaluated_again and not uses_fsdp(accelerator):
        eval_cache = FrozenFeatureCache(len(transformer_blocks(rm.lm)) - cfg.train_top_layers, cache_tokens(eval_mine), "cache_eval_features")
        size = cache_size_bytes(eval_mine, rm.lm.config.hidden_size)
        log.info("held-out feature cache: the output of the lower %d blocks on the held-out rows, about %.2f GB", eval_cache.split, size / 1e9)

    def loss_fn(module, micro: list[EncodedComparison]):
        nonlocal cache
        batch = comparisons_batch(micro, pad_id, cfg.share_prompt, accelerator.device)  # shared: the prompt once a comparison
        if cache is not None:
            frozen = cache.batch(rm, micro, batch)
            if not cache.checked and not cache.check(rm, batch, frozen):
                cache = None
        scores = module(**batch) if cache is None else module(**batch, frozen=frozen, split=cache.split)
        loss_sum, stats = comparison_loss(scores, pair_terms(micro, accelerator.device), cfg.centering_coef)
        stats["tokens"] = float(batch["attention_mask"].sum().item())
        stats["pairs"] = float(sum(len(e.pairs) for e in micro))
        return loss_sum, stats

    def score_mine(idx: list[int]) -> list[list[float]]:
        """Raw scores of the rows of this process's held-out comparisons, a list per comparison."""
        nonlocal eval_cache
        if eval_cache is not None:
            per_item = eval_cache.scores(rm, eval_mine, pad_id, cfg.batch_size * 2, cfg.precision)
            if per_item is not None:
                return per_item
            eval_cache = None
        rows = [r for i in idx for r in eval_enc[i].rows]
        # Under FSDP every process runs equally many forward passes: padding rows are scored, then dropped.
        world = accelerator.num_processes
        counts = [sum(len(e.rows) for e in eval_enc[r::world]) for r in range(world)]
        padded = even_batches(accelerator, rows, counts, cfg.batch_size * 2, eval_enc[0].rows[0] if eval_enc else None)
        flat = score_rows(wrapped, padded, pad_id, cfg.batch_size * 2, cfg.precision)[: len(rows)] if padded else []
        starts = np.cumsum([0] + [len(eval_enc[i].rows) for i in idx])
        return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        wrapped.eval()
        idx = list(range(accelerator.process_index, len(eval_enc), accelerator.num_processes))
        mine = dict(zip(idx, score_mine(idx)))
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([mine])
            mine = {i: s for part in gathered for i, s in part.items()}
        # Rows are distinct responses; map back to response order for the metrics.
        scores = [response_scores(eval_cmp[i], mine[i]) for i in range(len(eval_enc))]
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
    # Under FSDP2 the weights are gathered whole on the main process into a fresh copy of the model.
    rebuild = lambda: build_reward_model(base, tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers)  # noqa: E731
    trained: RewardModel | None = full_model(accelerator, wrapped, rebuild)
    if accelerator.is_main_process:
        trained.float()  # the standard folder is float32 throughout (and LoRA merges in float32)
        trained.eval()
        refs, what = reference_responses(cfg, train_cmp)
        spread = spread_responses(cfg, train_cmp)
        norm = normalisation_stats(trained, tokenizer, refs, cfg, cfg.batch_size * 2, spread)
        log.info("normalisation: mean %.4f over %s, std %.4f over %d training responses", norm["mean"], what, norm["std"], len(spread))
        stats = {
            **norm,
            "mean_measured_on": what,
            "std_measured_on": f"{len(spread)} responses (good and bad) of the training comparisons",
            "input_layout": LAYOUT_EOS,
            "base_model": cfg.model,
            "base_model_path": resolve_model(base),
            "lora": cfg.lora.enabled,
            "max_length": cfg.max_length,
            "max_prompt_share": cfg.max_prompt_share,
            "precision": cfg.precision,
            "train_comparisons": len(train_enc),
            "train_pairs": n_pairs,
            "steps": result.steps,
            "eval": result.evals[-1] if result.evals else {},
        }
        save_reward_model(trained, tokenizer, run.final, stats)
        if len(result.evals) > 1 and result.evals[0]:
            log.info("eval accuracy: first %.3f -> last %.3f", result.evals[0]["accuracy"], result.evals[-1]["accuracy"])
    accelerator.wait_for_everyone()
    return run.final
