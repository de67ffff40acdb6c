"""Sampling responses: used by `rlhfkit generate`, candidate generation, evaluation and PPO rollouts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GenerateConfig, GenerationSettings
from .data import load_prompts
from .models import load_causal_lm, load_tokenizer
from .tokens import encode_prompt, pad

log = logging.getLogger("rlhfkit.generate")


def model_path_of(name: str) -> str:
    """A run folder stands for its final model."""
    final = Path(name) / "final"
    return str(final) if (final / "config.json").exists() else name


@dataclass
class Sample:
    text: str
    token_ids: list[int]  # response tokens, up to and including the first EOS
    has_eos: bool


@torch.no_grad()
def sample_ids(
    model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationSettings, eos_id: int, pad_id: int,
    num_samples: int = 1, num_tokens: int | None = None,
) -> torch.Tensor:
    """Left-padded prompts (B, P) -> response token ids (B * num_samples, T), pad after the end.

    `num_tokens` is the tokenizer's size: ids at or beyond it (rows of a vocabulary padded for
    speed) and the pad id are never sampled.
    """
    greedy = gen.temperature == 0
    if greedy and num_samples > 1:  # greedy decoding gives one answer; repeat it
        prompt_ids = prompt_ids.repeat_interleave(num_samples, 0)
        attention_mask = attention_mask.repeat_interleave(num_samples, 0)
        num_samples = 1
    vocab = model.get_output_embeddings().weight.shape[0]
    suppress = sorted({pad_id, *range(num_tokens or vocab, vocab)})
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=attention_mask,
        max_new_tokens=gen.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else gen.temperature,
        top_p=None if greedy else gen.top_p,
        top_k=gen.top_k if gen.top_k and not greedy else None,
        num_return_sequences=num_samples,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=suppress,
    )
    return out[:, prompt_ids.shape[1] :]


def encode_prompts(tokenizer, prompts: list[list[dict]], gen: GenerationSettings) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [encode_prompt(tokenizer, m, gen.max_prompt_length, gen.system_prompt) for m in prompts]
    return pad(ids, tokenizer.pad_token_id, side="left"), pad([[1] * len(i) for i in ids], 0, side="left")


def split_responses(tokenizer, response_ids: torch.Tensor) -> list[Sample]:
    """Cut each row after its first EOS; decode the text without special tokens."""
    samples = []
    for row in response_ids.tolist():
        has_eos = tokenizer.eos_token_id in row
        tokens = row[: row.index(tokenizer.eos_token_id) + 1] if has_eos else [t for t in row if t != tokenizer.pad_token_id]
        samples.append(Sample(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, has_eos))
    return samples


def generate_responses(model, tokenizer, prompts: list[list[dict]], gen: GenerationSettings, num_samples: int = 1, progress: bool = True) -> list[list[Sample]]:
    """`num_samples` responses for each prompt, batched."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(gen.seed)
    results: list[list[Sample]] = []
    for i in tqdm(range(0, len(prompts), gen.batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        ids, mask = encode_prompts(tokenizer, prompts[i : i + gen.batch_size], gen)
        out = sample_ids(
            model, ids.to(device), mask.to(device), gen, tokenizer.eos_token_id, tokenizer.pad_token_id, num_samples, len(tokenizer)
        )
        flat = split_responses(tokenizer, out.cpu())
        results.extend(flat[j : j + num_samples] for j in range(0, len(flat), num_samples))
    return results


def load_for_inference(name: str, precision: str = "bf16"):
    tokenizer = load_tokenizer(model_path_of(name), padding_side="left")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_causal_lm(model_path_of(name), tokenizer, dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer


def run_generate(cfg: GenerateConfig) -> Path:
    prompts = load_prompts(cfg.prompts)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    model, tokenizer = load_for_inference(cfg.model, cfg.precision)
    samples = generate_responses(model, tokenizer, prompts, cfg.generation, cfg.num_samples)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    sampling = cfg.generation.model_dump()
    with out.open("w") as f:
        for messages, group in zip(prompts, samples):
            for s in group:
                record = {
                    "prompt": messages[-1]["content"],
                    "messages": messages,
                    "response": s.text,
                    "has_eos": s.has_eos,
                    "model": cfg.model,
                    "sampling": sampling,
                }
                f.write(json.dumps(record) + "\n")
    log.info("wrote %d responses to %s", sum(len(g) for g in samples), out)
    return out
