"""Shared fixtures: a tiny tokenizer and a tiny random Llama, built offline in seconds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Tests never reach a hub. Tiny models run fastest on one thread (two threads on a busy 2-core
# machine spend more time synchronising than computing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a an is are was be to of and in that have it for not on with he as you do at this but his by from "
    "they we say her she or will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good some could them see other than "
    "then now look only come its over think also back after use two how our work first well way even new want "
    "because any these give day most us answer question help please thanks sure here yes banana apple river"
).split()


def build_tiny_tokenizer(out_dir: Path):
    """A 400-token BPE tokenizer with a ChatML template; like SmolLM2's GGUF tokenizer, pad = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and its tokenizer, loadable by every step."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer(out)
    build_tiny_model(out, vocab_size=len(tok))
    return out


@pytest.fixture()
def demos_file(tmp_path) -> Path:
    """60 short demonstrations in the canonical JSONL form."""
    import json

    rng = random.Random(1)
    path = tmp_path / "demos.jsonl"
    with path.open("w") as f:
        for i in range(60):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            f.write(json.dumps({"prompt": f"{prompt} {i}", "response": response}) + "\n")
    return path
