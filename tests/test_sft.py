"""Step 1 (SFT) with a tiny random model: masking, pad token, truncation, packing, resume, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import ConfigError, SFTConfig, load_config
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.sft import ResponseLoss, batch_to_inputs, run_sft
from rlhfkit.tokens import IGNORE_INDEX, encode_example, encode_prompt, encode_response, pack, truncate
from rlhfkit.training import read_metrics

MESSAGES = [{"role": "user", "content": "what is the answer"}]


def sft_config(tiny_model_dir, demos_file, out, **overrides) -> SFTConfig:
    fields = dict(
        model=str(tiny_model_dir),
        data=str(demos_file),
        output_dir=str(out),
        batch_size=4,
        grad_accum=2,
        max_steps=8,
        learning_rate=3e-3,
        eval_every=4,
        checkpoint_every=2,
        eval_fraction=0.2,
        precision="fp32",
        max_length=64,
    )
    fields.update(overrides)
    return SFTConfig(**fields)


def test_pad_token_differs_from_eos(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    # The fixture tokenizer, like SmolLM2's GGUF one, ships with pad == EOS.
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(str(tiny_model_dir), tok)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_prompt_masked_response_and_eos_trained(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ex = encode_example(tok, MESSAGES, "yes sure banana", max_length=128)
    prompt = encode_prompt(tok, MESSAGES)
    response = encode_response(tok, "yes sure banana")
    assert ex.input_ids == prompt + response
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt) :] == response
    assert ex.labels[-1] == tok.eos_token_id  # EOS ends the response and is trained
    # The prompt contains EOS tokens too (end of each chat turn), and those are masked.
    assert tok.eos_token_id in prompt


def test_truncation_rule():
    prompt, response = list(range(100)), list(range(1000, 1050))
    p, r, cut = truncate(prompt, response, max_length=120, max_prompt_share=0.5)
    assert cut and len(p) + len(r) == 120
    assert p == prompt[-70:] and r == response  # the prompt loses its oldest tokens first
    p, r, cut = truncate(prompt, list(range(1000, 1200)), max_length=120, max_prompt_share=0.5)
    assert p == prompt[-60:] and r == list(range(1000, 1060))  # the prompt keeps its share; response cut at the end
    assert truncate([1, 2], [3], 10, 0.5) == ([1, 2], [3], False)


def test_packed_loss_equals_padded_loss(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tok).eval()
    examples = [encode_example(tok, MESSAGES, text, 128) for text in ("yes", "sure banana apple river", "no")]
    module = ResponseLoss(model)
    with torch.no_grad():
        padded = module(**batch_to_inputs(examples, tok.pad_token_id, "cpu"))
        rows = pack(examples, 512, tok.pad_token_id)
        assert len(rows) == 1
        packed = module(**batch_to_inputs(rows, tok.pad_token_id, "cpu"))
    assert packed[1] == padded[1]  # same trained-token count
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-4, atol=1e-4)


def test_sft_learns_and_writes_outputs(tiny_model_dir, demos_file, tmp_path):
    cfg = sft_config(tiny_model_dir, demos_file, tmp_path / "run", max_steps=12)
    final = run_sft(cfg)
    evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["phase"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    assert (final / "config.json").exists() and (tmp_path / "run" / "config.yaml").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)  # plain transformers loads the output
    assert any((tmp_path / "run" / "tb").iterdir())


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, demos_file, tmp_path, lora):
    extra = {"lora": {"enabled": True, "r": 4, "alpha": 8}} if lora else {}
    straight = sft_config(tiny_model_dir, demos_file, tmp_path / "a", **extra)
    run_sft(straight)
    broken = sft_config(tiny_model_dir, demos_file, tmp_path / "b", **extra)
    run_sft(broken, stop_after=5)  # "crash" after step 5; last checkpoint is step 4
    assert not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoints" / "step-0000004").exists()
    run_sft(broken)  # the same command again resumes
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # Metrics of the redone steps are not duplicated.
    steps = [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if m["phase"] == "train"]
    assert steps == sorted(set(steps))


def test_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: default\nlearning_rate: fast\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    msg = str(err.value)
    assert f"{path}:2: field 'learning_rate'" in msg
    assert f"{path}:4: field 'lora.r'" in msg
    path.write_text("modle: default\n")
    with pytest.raises(ConfigError, match=r"sft.yaml:1: field 'modle': Extra inputs are not permitted"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        path.write_text("a: [1, 2\n")
        load_config(SFTConfig, path)


def test_cli_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("batch_size: 3\nlora:\n  enabled: false\n")
    cfg = load_config(SFTConfig, path, ["--batch_size", "5", "--lora.enabled", "true", "--lora.r=4", "--packing"])
    assert cfg.batch_size == 5 and cfg.lora.enabled and cfg.lora.r == 4 and cfg.packing


def test_every_config_field_is_documented():
    from rlhfkit import config

    for cls in (config.SFTConfig, config.GenerateConfig, config.LoraSettings, config.GenerationSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"


def test_generate_cli(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello there"\n{"prompt": "what is the answer"}\n')
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
           "-o", str(out), "--generation.max_new_tokens", "8", "--num_samples", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"] == "hello there"
    assert all(isinstance(r["response"], str) and "sampling" in r for r in rows)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tiny_model_dir, demos_file, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) = single process on the same global batch.

    (`--multi_gpu` is accelerate's torchrun launcher; without a GPU rlhfkit's Accelerator forms a gloo group.)
    """
    common = ["--model", str(tiny_model_dir), "--data", str(demos_file), "--max_steps", "4", "--eval_every", "0",
              "--checkpoint_every", "0", "--precision", "fp32", "--learning_rate", "3e-3", "--max_length", "64"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "rlhfkit.cli", "sft", "--output_dir", str(tmp_path / "one"), "--batch_size", "4", "--grad_accum", "2", *common]
    subprocess.run(single, check=True, capture_output=True, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhfkit.cli", "sft",
              "--output_dir", str(tmp_path / "two"), "--batch_size", "2", "--grad_accum", "2", *common]  # fmt: skip
    proc = subprocess.run(launch, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # summation order differs across processes


def test_train_top_layers_freezes_the_rest(tiny_model_dir, demos_file, tmp_path):
    from safetensors.torch import load_file as load

    cfg = sft_config(tiny_model_dir, demos_file, tmp_path / "top", train_top_layers=1, max_steps=3, checkpoint_every=0)
    run_sft(cfg)
    before = load(str(tiny_model_dir / "model.safetensors"))
    after = _final_weights(tmp_path / "top")
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def test_lora_with_train_top_layers_puts_adapters_on_the_top_blocks_only(tiny_model_dir):
    """All-linear LoRA on the top block: the same modules get adapters as without the limit, in that block only."""
    from rlhfkit.config import LoraSettings
    from rlhfkit.models import load_causal_lm

    lora = LoraSettings(enabled=True, r=4, alpha=8)
    everywhere = {n for n, p in load_causal_lm(str(tiny_model_dir), lora=lora).named_parameters() if p.requires_grad}
    top = {n for n, p in load_causal_lm(str(tiny_model_dir), lora=lora, train_top_layers=1).named_parameters() if p.requires_grad}
    assert top and top == {n for n in everywhere if ".layers.1." in n}
    with pytest.raises(ValueError, match=r"lora.target_modules: the pattern '\.\*proj' cannot be combined"):
        load_causal_lm(str(tiny_model_dir), lora=lora.model_copy(update={"target_modules": ".*proj"}), train_top_layers=1)
