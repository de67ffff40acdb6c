"""Step 1: supervised fine-tuning (SFT) on demonstrations.

The loss is the next-token cross-entropy on response tokens and the EOS that ends each
response; prompt tokens (the chat-template-rendered conversation) carry no loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

from .config import SFTConfig
from .data import Rows, demonstration_dataset, example_from_row, split_rows
from .distributed import even_share, full_model, wrap_blocks
from .losses import ResponseLoss, batch_to_inputs, trained_tokens  # noqa: F401 (step 1's loss, shared with step 3)
from .models import enable_activation_checkpointing, load_causal_lm, load_tokenizer, save_model
from .tokens import IGNORE_INDEX, Example, encode_example, pack
from .training import (
    DataPlan,
    RunDir,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    reduce_and_finish,
    save_run_config,
    seed_everything,
    total_steps_for,
    train_supervised,
)

log = logging.getLogger("rlhfkit.sft")


def encode_all(tokenizer, demos, cfg: SFTConfig) -> tuple[list[Example], int]:
    examples = [encode_example(tokenizer, d.messages, d.response, cfg.max_length, cfg.max_prompt_share) for d in demos]
    return examples, sum(e.truncated for e in examples)


def item_lengths(examples: Sequence[Example]):
    """Token counts of the examples: the dataset's length column, or one pass over a list."""
    return examples.column("length") if isinstance(examples, Rows) else [len(e) for e in examples]


def _main_process_first():
    """Under `accelerate launch` the main process writes the data files, then the others read them (the
    accelerator is made later, in train_sft, with the same `cpu` setting)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return nullcontext()
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def load_sft_examples(cfg: SFTConfig, tokenizer) -> tuple[Sequence[Example], list[Example]]:
    """Read, split (by prompt) and tokenise the demonstrations; log how many were truncated.

    The training examples stay on disk: the records are streamed into an arrow file in the run folder's
    data/, tokenised by `Dataset.map` and memory-mapped (a resumed run reuses the files), and an Example is
    built only when the data plan asks for it. The eval examples (at most max_eval_examples) are a list.
    `load_demonstrations` + `split_by_prompt` + `encode_all` give the same examples as lists."""

    def dataset(spec):
        return demonstration_dataset(
            spec, tokenizer, max_length=cfg.max_length, max_prompt_share=cfg.max_prompt_share, cache_dir=Path(cfg.output_dir) / "data"
        )

    with _main_process_first():
        train_set = dataset(cfg.data)
        eval_set = dataset(cfg.eval_data) if cfg.eval_data is not None else train_set
    if cfg.eval_data is not None:
        train_rows, eval_rows = None, range(len(eval_set))
    else:
        train_rows, eval_rows = split_rows(train_set, cfg.eval_fraction, seed=cfg.seed)
    train_examples = Rows(train_set, example_from_row, train_rows)
    eval_examples = list(Rows(eval_set, example_from_row, eval_rows[: cfg.max_eval_examples]))
    n_cut, n_cut_eval = int(train_examples.column("truncated").sum()), sum(e.truncated for e in eval_examples)
    log.info(
        "SFT data: %d train / %d eval demonstrations; %d train and %d eval examples truncated to %d tokens",
        len(train_examples), len(eval_examples), n_cut, n_cut_eval, cfg.max_length,
    )  # fmt: skip
    if not len(train_examples):
        raise ValueError(f"{cfg.data}: no training demonstrations")
    return train_examples, eval_examples


def run_sft(cfg: SFTConfig, stop_after: int | None = None) -> Path:
    """Train, evaluate and save; returns the folder of the final model. Resumes if interrupted."""
    run = RunDir(cfg.output_dir)
    if run.is_done():
        log.info("%s is complete; nothing to do", run.final)
        return run.final
    tokenizer = load_tokenizer(cfg.model)
    train_examples, eval_examples = load_sft_examples(cfg, tokenizer)
    return train_sft(cfg, tokenizer, train_examples, eval_examples, stop_after)


def train_sft(cfg: SFTConfig, tokenizer, train_examples: Sequence[Example], eval_examples: list[Example], stop_after: int | None = None) -> Path:
    """The training part of step 1, on already tokenised examples."""
    run = RunDir(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    if accelerator.is_main_process:
        save_run_config(cfg, run)

    items = pack(train_examples, cfg.max_length, tokenizer.pad_token_id) if cfg.packing else train_examples

    def weight(item) -> float:
        return float(trained_tokens(item) if isinstance(item, Example) else (item["labels"][0, 1:] != IGNORE_INDEX).sum())

    plan = DataPlan(
        items=items,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        seed=cfg.seed,
        weight=weight,
        lengths=item_lengths(items) if cfg.group_by_length and not cfg.packing else None,
    )
    model = load_causal_lm(cfg.model, tokenizer, dropout=cfg.dropout, lora=cfg.lora, train_top_layers=cfg.train_top_layers)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = ResponseLoss(model)
    optimizer = make_optimizer(wrapped, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps_for(plan, cfg))
    wrap_blocks(accelerator, wrapped)  # FSDP2 only: one shard unit per transformer block
    wrapped, optimizer, scheduler = accelerator.prepare(wrapped, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id

    def loss_fn(module, micro):
        loss_sum, n_tokens, correct = module(**batch_to_inputs(micro, pad_id, accelerator.device))
        # `tokens` counts every token processed (prompt + response), for throughput.
        seen = sum(len(e) if isinstance(e, Example) else e["input_ids"].shape[1] for e in micro)
        stats = {"loss_sum": loss_sum.item(), "loss_count": n_tokens.item(), "tokens": seen}
        stats.update(token_accuracy_sum=correct.item(), token_accuracy_count=n_tokens.item())
        return loss_sum, stats

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        wrapped.eval()
        stats = {"loss_sum": 0.0, "loss_count": 0.0}
        shard, real = even_share(eval_examples, accelerator, cfg.batch_size)
        # Padding (FSDP: equally many forward passes on every process) carries no label, so no loss.
        shard[real:] = [dataclasses.replace(e, labels=[IGNORE_INDEX] * len(e.labels)) for e in shard[real:]]
        for i in range(0, len(shard), cfg.batch_size):
            with accelerator.autocast():
                loss_sum, n_tokens, _ = wrapped(**batch_to_inputs(shard[i : i + cfg.batch_size], pad_id, accelerator.device))
            stats["loss_sum"] += loss_sum.item()
            stats["loss_count"] += n_tokens.item()
        out = reduce_and_finish(accelerator, stats)
        out["perplexity"] = math.exp(min(out["loss"], 50.0)) if out.get("loss") == out.get("loss") else float("nan")
        if accelerator.is_main_process:
            log.info("eval loss %.4f  perplexity %.2f", out["loss"], out["perplexity"])
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
        desc="sft",
        stop_after=stop_after,
    )
    if not result.finished:  # stopped early (tests simulate a crash this way)
        return run.path
    # Under FSDP2 the weights are gathered whole on the main process into a fresh copy of the model.
    rebuild = lambda: ResponseLoss(load_causal_lm(cfg.model, tokenizer, lora=cfg.lora, train_top_layers=cfg.train_top_layers))  # noqa: E731
    trained = full_model(accelerator, wrapped, rebuild)
    if accelerator.is_main_process:
        save_model(trained.model, tokenizer, run.final, merge_lora=cfg.lora.merge_on_save)
        evals = result.evals
        if len(evals) > 1:
            log.info("eval loss: first %.4f -> last %.4f", evals[0]["loss"], evals[-1]["loss"])
    accelerator.wait_for_everyone()
    return run.final
