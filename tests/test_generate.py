"""Sampling (`rlhfkit.generate`): what is sampled is softmax(logits / temperature) over the sampling support and
nothing else, whatever the model's generation_config.json says."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rlhfkit.config import GenerationSettings
from rlhfkit.generate import sample_ids, sampling_support
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.tokens import encode_prompt, pad

# a generation_config.json that would change the distribution in many ways if it were inherited
MEDDLING = dict(
    do_sample=True, temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.5, no_repeat_ngram_size=2,
    min_new_tokens=6, min_p=0.2, bad_words_ids=[[7]],
)  # fmt: skip


def with_generation_config(model_dir: Path, out: Path, **fields) -> Path:
    """A copy of a model folder whose generation_config.json sets ``fields``."""
    from transformers import GenerationConfig

    shutil.copytree(model_dir, out)
    GenerationConfig(**fields).save_pretrained(out)
    return out


def with_padded_vocabulary(model_dir: Path, out: Path, extra: int = 16, scale: float = 3.0) -> Path:
    """A copy of a model folder whose vocabulary has ``extra`` rows past the tokenizer (room for the pad token
    and ids that are no token), with large embeddings so that those ids get large logits."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n + extra, mean_resizing=False)
    torch.manual_seed(4)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = torch.randn(extra, model.config.hidden_size) * scale
    model.save_pretrained(out)
    return out


def capture_sampler_logprobs(model, store: list) -> None:
    """Make ``model.generate`` also keep the sampler's own log-probs of the drawn tokens, from its processed
    scores (the logits after every logits processor, temperature included)."""
    real = model.generate

    def generate(*args, **kwargs):
        out = real(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        drawn = out.sequences[:, -len(out.scores) :]
        scores = torch.stack(out.scores, 1).float()
        store.append(torch.log_softmax(scores, -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
        return out.sequences

    model.generate = generate


def test_greedy_sampling_ignores_the_models_generation_config(tiny_model_dir, tmp_path):
    """Greedy decoding is the argmax of the logits over the support, token by token, though the model's
    generation_config.json asks for sampling, repetition penalty, n-gram blocking, minimum length, ..."""
    path = with_generation_config(tiny_model_dir, tmp_path / "m", **MEDDLING)
    tok = load_tokenizer(str(path), padding_side="left")
    model = load_causal_lm(str(path), tok).eval()
    support = sampling_support(model.get_output_embeddings().weight.shape[0], len(tok), tok.pad_token_id)
    prompts = [encode_prompt(tok, [{"role": "user", "content": text}]) for text in ("yes banana", "the river is good today", "help")]
    gen = GenerationSettings(max_new_tokens=10, temperature=0)
    ids = pad(prompts, tok.pad_token_id, side="left")
    out = sample_ids(model, ids, pad([[1] * len(p) for p in prompts], 0, side="left"), gen, tok.eos_token_id, tok.pad_token_id, num_tokens=len(tok))
    for prompt, row in zip(prompts, out.tolist()):
        expected = []
        with torch.no_grad():
            while len(expected) < gen.max_new_tokens and tok.eos_token_id not in expected:
                logits = model(input_ids=torch.tensor([prompt + expected])).logits[0, -1]
                expected.append(int(logits.masked_fill(~support, float("-inf")).argmax()))
        assert row[: len(expected)] == expected
    assert model.generation_config.repetition_penalty == 1.5  # the model's own config is put back
