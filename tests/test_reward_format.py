"""Reward models in the Hugging Face standard, both ways: what `rlhfkit reward` saves loads in plain
transformers with the same raw score; a reward model trained elsewhere (a TRL-style
LlamaForSequenceClassification with another tokenizer and chat template) drives score, reward-eval,
PPO and evaluate; earlier rlhfkit folders still load; what is not a reward model fails clearly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import WORDS
from rlhfkit.config import EvaluateConfig, GenerationSettings, LoraSettings
from rlhfkit.models import load_causal_lm, load_tokenizer, save_model
from rlhfkit.reward import (
    NotARewardModelError,
    build_reward_model,
    load_reward_model,
    run_reward,
    run_reward_eval,
    run_score,
    save_reward_model,
    score,
)
from test_ppo import _rollout_by_hand, ppo_config, prompts_file  # noqa: F401  (a fixture)
from test_reward import tiny_config, user, write_synthetic

ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PROMPTS = [user("what is a banana"), user("the river"), [{"role": "system", "content": "be brief"}, *user("help please")]]
RESPONSES = ["yes banana apple", "the river is long and the way is good", "sure"]


def build_foreign_reward_model(out: Path, tokenizer=None, seed: int = 5) -> Path:
    """What TRL's RewardTrainer leaves: LlamaForSequenceClassification(num_labels=1) with pad = EOS in its
    config, saved by plain save_pretrained next to its tokenizer (by default another vocabulary and template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    if tokenizer is None:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
        trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 3)], trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
        tokenizer.chat_template = ZEPHYR
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def foreign_rm(tmp_path_factory) -> Path:
    return build_foreign_reward_model(tmp_path_factory.mktemp("trl-rm"))


@pytest.fixture(scope="module")
def our_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A short `rlhfkit reward` run (the weights need not be good, only saved)."""
    tmp = tmp_path_factory.mktemp("rm-run")
    return run_reward(tiny_config(tmp, tiny_model_dir, write_synthetic(tmp / "d.jsonl", n=40), max_steps=3))


def hf_scores(folder, texts: list[str]) -> list[float]:
    """Raw scores as plain transformers computes them: one right-padded batch, logits[:, 0]."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].tolist()


# ----------------------------------------------------------------------------- rlhfkit -> transformers

PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, prompts, responses = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32).eval()
texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + r + tok.eos_token for m, r in zip(prompts, responses)]
enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
with torch.no_grad():
    raw = model(**enc).logits[:, 0].tolist()
assert not [m for m in sys.modules if m.startswith("rlhfkit")]
print(json.dumps({"raw": raw, "stats": model.config.reward_stats}))
"""


def test_plain_transformers_reads_what_rlhfkit_reward_saves(our_run):
    """No rlhfkit import: AutoModelForSequenceClassification gives rlhfkit's raw score (fp32, 1e-4), batched
    with padding (pad_token_id in the config); the normalisation rlhfkit applies travels in config.json."""
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(our_run), json.dumps(PROMPTS), json.dumps(RESPONSES)],
        capture_output=True, text=True, env=env, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    rm, tok, stats = load_reward_model(our_run)
    assert plain["stats"] == stats and {"mean", "std", "mean_measured_on", "std_measured_on"} <= set(stats)
    ours = score(rm, tok, PROMPTS, RESPONSES, normalise=False)
    assert len(set(ours)) == 3  # the rows really differ
    assert plain["raw"] == pytest.approx(ours, abs=1e-4)
    normalised = score(rm, tok, PROMPTS, RESPONSES)
    assert normalised == pytest.approx([(r - stats["mean"]) / stats["std"] for r in plain["raw"]], abs=1e-4)


def test_lora_run_saves_the_merged_standard_form(tiny_model_dir, tmp_path, caplog):
    """A LoRA reward run saves merged weights that transformers loads; a peft adapter of a reward model
    (task SEQ_CLS, the head in modules_to_save) loads too, with the same scores."""
    data = write_synthetic(tmp_path / "d.jsonl", n=40)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, max_steps=2, learning_rate=5e-2, lora=LoraSettings(enabled=True, r=4))
    final = run_reward(cfg)
    assert not (final / "adapter_config.json").exists() and not (final / "adapter").exists()
    rm, tok, stats = load_reward_model(final)
    assert stats["lora"] is True
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + r + tok.eos_token for m, r in zip(PROMPTS, RESPONSES)]
    assert hf_scores(final, texts) == pytest.approx(score(rm, tok, PROMPTS, RESPONSES, normalise=False), abs=1e-4)

    # The unmerged form: an adapter whose modules_to_save holds the trained score head.
    torch.manual_seed(0)
    lora_rm = build_reward_model(str(tiny_model_dir), tok, lora=LoraSettings(enabled=True, r=4))
    with torch.no_grad():
        for name, p in lora_rm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    lora_rm.lm.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)  # the added pad row
    tok.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    expected = score(lora_rm.eval(), tok, PROMPTS, RESPONSES, normalise=False)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.reward"):
        loaded, tok2, stats2 = load_reward_model(tmp_path / "adapter")
    assert stats2 == {} and "used raw" in caplog.text
    loaded.stats["input_layout"] = "prompt+response+eos"  # rlhfkit's layout, as the adapter was trained
    assert score(loaded, tok2, PROMPTS, RESPONSES, normalise=False) == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- transformers -> rlhfkit


def test_a_trl_reward_model_reads_text_in_its_own_template(foreign_rm, caplog):
    """No statistics: raw scores and a warning. A complete response is read as its chat template renders
    the whole conversation (end of turn included); a response cut without EOS stays cut."""
    with caplog.at_level(logging.WARNING, logger="rlhfkit.reward"):
        rm, tok, stats = load_reward_model(foreign_rm)
    assert stats == {} and "no normalisation statistics" in caplog.text and str(foreign_rm) in caplog.text
    assert len(tok) == 330 and tok.chat_template == ZEPHYR  # its own tokenizer, nothing added
    whole = [tok.apply_chat_template([*m, {"role": "assistant", "content": r}], tokenize=False) for m, r in zip(PROMPTS, RESPONSES)]
    assert whole[0].endswith("yes banana apple</s>\n")
    expected = hf_scores(foreign_rm, whole)
    assert score(rm, tok, PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)  # normalised = raw here
    cut = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + r for m, r in zip(PROMPTS, RESPONSES)]
    got = score(rm, tok, PROMPTS, RESPONSES, complete=[True, False, False])
    assert got == pytest.approx([expected[0], *hf_scores(foreign_rm, cut)[1:]], abs=1e-5)
    assert got[1] != pytest.approx(expected[1], abs=1e-3)


def test_score_and_reward_eval_take_a_trl_reward_model(foreign_rm, tmp_path):
    data = write_synthetic(tmp_path / "d.jsonl", n=12)
    out = run_score(str(foreign_rm), str(data), str(tmp_path / "scores.jsonl"))
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    rm, tok, _ = load_reward_model(foreign_rm)
    first = lines[0]
    assert first["rewards"] == pytest.approx(score(rm, tok, [first["messages"]] * len(first["responses"]), first["responses"]), abs=1e-5)
    metrics = run_reward_eval(str(foreign_rm), str(data))
    assert metrics["reward_model"] == str(foreign_rm) and metrics["pairs"] > 12 and 0 <= metrics["accuracy"] <= 1


def test_a_reward_model_by_hub_id_from_the_hf_cache(foreign_rm, tmp_path):
    """A hub id resolves offline in the HF cache (the CLI, in a fresh process)."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-rm" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in foreign_rm.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--tiny-org--tiny-rm" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-rm" / "refs" / "main").write_text("a" * 40)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [*m, {"role": "assistant", "content": r}]}) + "\n" for m, r in zip(PROMPTS, RESPONSES)))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "rlhfkit.cli", "score", "-m", "tiny-org/tiny-rm", "-i", str(demos), "-o", str(tmp_path / "s.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rm, tok, _ = load_reward_model(foreign_rm)
    got = [json.loads(l)["reward"] for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert got == pytest.approx(score(rm, tok, PROMPTS, RESPONSES), abs=1e-5)


def test_ppo_with_a_trl_reward_model_of_another_vocabulary(tiny_model_dir, foreign_rm, prompts_file, tmp_path):  # noqa: F811
    """PPO re-encodes the responses in the reward model's template (cut ones stay cut) and trains."""
    from rlhfkit.rl import PPOTrainer
    from rlhfkit.training import read_metrics

    with pytest.raises(ValueError, match="critic_init: policy"):
        PPOTrainer(ppo_config(tiny_model_dir, foreign_rm, prompts_file, tmp_path / "a"))
    trainer = PPOTrainer(ppo_config(tiny_model_dir, foreign_rm, prompts_file, tmp_path / "b", critic_init="policy"))
    trainer.iteration_index = 0
    assert not trainer.nets.same_vocab
    ptok = trainer.tokenizer
    texts = ["yes banana apple", "the river the river the"]
    ids = [ptok(texts[0], add_special_tokens=False)["input_ids"] + [ptok.eos_token_id], ptok(texts[1], add_special_tokens=False)["input_ids"]]
    batch = _rollout_by_hand(trainer, ids, width=max(len(i) for i in ids))
    assert batch.has_eos.tolist() == [True, False]
    batch = trainer.experience(batch)
    expected = score(trainer.nets.reward_model, trainer.nets.rm_tokenizer, batch.messages, texts, complete=[True, False])
    torch.testing.assert_close(batch.rm_scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert expected[1] != pytest.approx(score(trainer.nets.reward_model, trainer.nets.rm_tokenizer, batch.messages[1:], texts[1:])[0], abs=1e-4)
    final = trainer.train()
    rows = [m for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "score" in m]
    assert final.exists() and len(rows) == 2 and all(torch.isfinite(torch.tensor(m["score"])) for m in rows)


def test_critic_from_a_trl_reward_model_on_the_policy_tokenizer(tiny_model_dir, prompts_file, tmp_path):  # noqa: F811
    """A reward model trained elsewhere on the policy's base tokenizer (pad = EOS, no added pad token) can
    initialise the critic: its head (no statistics: unscaled) becomes the value head; its text is re-encoded."""
    from transformers import AutoTokenizer

    from rlhfkit.rl import PPOTrainer

    rm_dir = build_foreign_reward_model(tmp_path / "rm", tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer = PPOTrainer(ppo_config(tiny_model_dir, rm_dir, prompts_file, tmp_path / "run", max_steps=1))
    nets = trainer.nets
    assert not nets.same_vocab  # the chat-template layout is re-encoded, not read from the policy's ids
    torch.testing.assert_close(trainer.ac.value_head.weight.detach(), nets.reward_model.head.weight.detach())
    assert nets.reward_model.lm.config.pad_token_id == nets.rm_tokenizer.eos_token_id  # still reads as trained
    trainer.train()
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_evaluate_with_a_trl_reward_model(tiny_model_dir, foreign_rm, tmp_path):
    from rlhfkit.evaluate import evaluate_policies

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i : i + 5])}) + "\n" for i in range(0, 24, 6)))
    cfg = EvaluateConfig(
        output_dir=str(tmp_path / "eval"), sft_model=str(tiny_model_dir), rlhf_model=str(tiny_model_dir), reward_model=str(foreign_rm),
        prompts=str(prompts), comparisons=str(write_synthetic(tmp_path / "c.jsonl", n=8)), batch_size=4, precision="fp32",
        generation=GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=4),
    )  # fmt: skip
    metrics, records = evaluate_policies(cfg, progress=False)
    records = records["heldout"]
    assert metrics["reward_model_accuracy"]["pairs"] > 8
    rm, tok, _ = load_reward_model(foreign_rm)
    got = [r["sft"]["score"] for r in records]
    want = score(rm, tok, [r["messages"] for r in records], [r["sft"]["response"] for r in records], complete=[r["sft"]["has_eos"] for r in records])
    assert got == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------- earlier folders, wrong folders


def write_legacy_folder(tiny_model_dir, out: Path, bias: float = 0.7) -> tuple[Path, torch.Tensor]:
    """An rlhfkit reward-model folder as earlier versions wrote it."""
    tok = load_tokenizer(str(tiny_model_dir))
    save_model(load_causal_lm(str(tiny_model_dir), tok), tok, out)
    torch.manual_seed(4)
    weight = torch.randn(1, 64) * 0.2
    save_file({"weight": weight, "bias": torch.tensor([bias])}, str(out / "reward_head.safetensors"))
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.1, "std": 2.0, "max_length": 64, "max_prompt_share": 0.5}))
    return out, weight


def test_an_earlier_rlhfkit_folder_loads_and_converts(tiny_model_dir, tmp_path, caplog):
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.reward import encode_pair_text

    legacy, weight = write_legacy_folder(tiny_model_dir, tmp_path / "old")
    # What the earlier code computed: the LM's last hidden state at the EOS, through the head with its bias.
    tok = load_tokenizer(str(legacy))
    lm = load_causal_lm(str(legacy), tok).eval()
    expected = []
    for m, r in zip(PROMPTS, RESPONSES):
        with torch.no_grad():
            hidden = lm.model(torch.tensor([encode_pair_text(tok, m, r, 64, 0.5)])).last_hidden_state[0, -1]
        expected.append(((hidden @ weight[0]).item() + 0.7 - 0.1) / 2.0)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.reward"):
        rm, tok2, stats = load_reward_model(legacy)
    assert "rlhfkit reward-convert" in caplog.text
    assert score(rm, tok2, PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)

    result = CliRunner().invoke(app, ["reward-convert", str(legacy), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    new = tmp_path / "new"
    assert not (new / "reward_head.safetensors").exists() and len(json.loads((new / "config.json").read_text())["id2label"]) == 1
    rm3, tok3, stats3 = load_reward_model(new)
    assert stats3["mean"] == pytest.approx(0.1 - 0.7) and stats3["std"] == 2.0
    assert score(rm3, tok3, PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    texts = [tok3.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + r + tok3.eos_token for m, r in zip(PROMPTS, RESPONSES)]
    assert hf_scores(new, texts) == pytest.approx(score(rm3, tok3, PROMPTS, RESPONSES, normalise=False), abs=1e-5)


def test_what_is_not_a_reward_model_fails_clearly(tiny_model_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    with pytest.raises(NotARewardModelError, match=rf"{tiny_model_dir}: a causal language model \(LlamaForCausalLM\), not a reward model"):
        load_reward_model(tiny_model_dir)
    three = tmp_path / "three-labels"
    config = LlamaConfig(vocab_size=401, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(three)
    with pytest.raises(NotARewardModelError, match=rf"{three}: a sequence-classification model with num_labels=3"):
        load_reward_model(three)
    encoder = tmp_path / "encoder"  # one label, but a pooled encoder head: not read at the last token
    BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, num_labels=1)).save_pretrained(encoder)  # fmt: skip
    with pytest.raises(NotARewardModelError, match=rf"{encoder}: BertForSequenceClassification has no linear `score` head"):
        load_reward_model(encoder)
    legacy = tmp_path / "half-legacy"
    legacy.mkdir()
    (legacy / "reward_head.safetensors").write_bytes(b"")
    with pytest.raises(NotARewardModelError, match="no reward_stats.json"):
        load_reward_model(legacy)
    demos = tmp_path / "d.jsonl"
    demos.write_text(json.dumps({"prompt": "hi", "response": "yes"}) + "\n")
    result = CliRunner().invoke(app, ["score", "-m", str(three), "-i", str(demos), "-o", str(tmp_path / "s.jsonl")])
    assert result.exit_code == 1 and "num_labels=3" in result.output and "Traceback" not in result.output
