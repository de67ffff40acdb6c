"""Sampling responses: used by `rlhfkit generate`, candidate generation, evaluation and PPO rollouts."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

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


def sampling_support(vocab_size: int, num_tokens: int | None, pad_id: int | None) -> torch.Tensor:
    """The ids the sampler may draw, ``(V,)`` bool: every id but the pad id and the rows at or beyond
    the tokenizer's size ``num_tokens`` (a vocabulary padded for speed). PPO's and the evaluation's
    log-probs normalise over the same ids (`rl.logprobs.logprobs_from_logits(..., support=)`)."""
    support = torch.zeros(vocab_size, dtype=torch.bool)
    support[: num_tokens or vocab_size] = True
    if pad_id is not None:
        support[pad_id] = False
    return support


def sampling_config(gen: GenerationSettings, eos_id: int, pad_id: int, suppress: list[int], num_samples: int = 1) -> GenerationConfig:
    """A complete generation config: softmax(logits / temperature) (top_p / top_k as set) over the ids
    not in ``suppress``, and nothing else. Every other logits processor of transformers is switched off
    explicitly (repetition penalties, n-gram blocking, min_p / typical / epsilon / eta cutoffs, bad words,
    forced or minimum tokens, ...), so a model's generation_config.json cannot change what is sampled:
    PPO's log-probs, ratio and KL assume exactly this distribution."""
    greedy = gen.temperature == 0
    return GenerationConfig(
        max_new_tokens=gen.max_new_tokens, min_new_tokens=0, max_time=None, stop_strings=None,  # min_length: 0 by default
        do_sample=not greedy, num_beams=1, num_beam_groups=1, penalty_alpha=None, dola_layers=None,
        temperature=1.0 if greedy else gen.temperature, top_p=1.0 if greedy else gen.top_p, top_k=0 if greedy else gen.top_k,
        min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, length_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, force_words_ids=None,
        sequence_bias=None, guidance_scale=None, watermarking_config=None,
        forced_bos_token_id=None, forced_eos_token_id=None, exponential_decay_length_penalty=None,
        suppress_tokens=suppress or None, begin_suppress_tokens=None,
        renormalize_logits=False, remove_invalid_values=False,
        num_return_sequences=num_samples, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
        use_cache=True,
    )  # fmt: skip


@contextlib.contextmanager
def _model_generation_config(model, config: GenerationConfig):
    """transformers fills every field of a passed config that is None from the model's own
    generation_config (generation_config.json): while sampling, that is ``config`` itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


@torch.no_grad()
def sample_ids(
    model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationSettings, eos_id: int, pad_id: int,
    num_samples: int = 1, num_tokens: int | None = None,
) -> torch.Tensor:
    """Left-padded prompts (B, P) -> response token ids (B * num_samples, T), pad after the end.

    `num_tokens` is the tokenizer's size: ids at or beyond it (rows of a vocabulary padded for
    speed) and the pad id are never sampled (`sampling_support`); nothing but temperature (and top_p /
    top_k where allowed) shapes the distribution (`sampling_config`).
    """
    greedy = gen.temperature == 0
    if greedy and num_samples > 1:  # greedy decoding gives one answer; repeat it
        prompt_ids = prompt_ids.repeat_interleave(num_samples, 0)
        attention_mask = attention_mask.repeat_interleave(num_samples, 0)
        num_samples = 1
    support = sampling_support(model.get_output_embeddings().weight.shape[0], num_tokens, pad_id)
    config = sampling_config(gen, eos_id, pad_id, (~support).nonzero().flatten().tolist(), num_samples)
    with _model_generation_config(model, config):
        out = model.generate(input_ids=prompt_ids, attention_mask=attention_mask, generation_config=config)
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
