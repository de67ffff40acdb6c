"""`rlhfkit dpo` end to end with tiny models.

* The gold-preference test (as tests/test_ppo_e2e.py for PPO): a scripted annotator prefers responses with the word
  "banana"; SFT on demonstrations where ~20% of the responses have it, K candidates per prompt from the SFT policy
  ranked by the annotator (K-wise, ties kept), DPO on those rankings. On held-out prompts the word becomes much more
  frequent at a bounded KL from SFT. The test can fail: the same run on the reversed rankings makes the word rarer
  (checked here), and `python tests/test_dpo.py --beta 50` or `--learning_rate 1e-9` leaves it where SFT had it.
* Kill-and-resume ends with the same weights as an uninterrupted run (and the cached reference is reused, or
  recomputed to the same numbers when it is gone).
* With LoRA the reference is the policy with its adapter switched off: one base network is loaded, and the cached
  reference log-probs are those of the SFT model.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ppo_e2e import _demonstration_response, _prompt, gold, gold_share_and_kl, messages  # noqa: E402

from conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402

KL_BOUND = 6.0  # nats per response, as the PPO test's 2 x target


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sft_and_rankings(root: Path) -> tuple[list[str], int]:
    """A tiny SFT policy in root/sft and the annotator's K-wise rankings of its samples in root/comparisons.jsonl
    (and the reversed rankings in root/reversed.jsonl). Returns (held-out prompts, comparisons)."""
    from rlhfkit.config import GenerationSettings, SFTConfig
    from rlhfkit.data import Comparison, comparison_to_json, write_jsonl
    from rlhfkit.generate import generate_responses, load_for_inference
    from rlhfkit.sft import run_sft

    base = root / "tiny"
    base.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(base)
    build_tiny_model(base, vocab_size=len(tok))
    rng = random.Random(0)
    write_jsonl(root / "demos.jsonl", [{"prompt": _prompt(rng), "response": _demonstration_response(rng)} for _ in range(300)])
    train_prompts = [_prompt(rng) for _ in range(200)]
    held_out = [_prompt(rng) for _ in range(64)]
    run_sft(SFTConfig(model=str(base), data=str(root / "demos.jsonl"), output_dir=str(root / "sft"), precision="fp32",
                      batch_size=16, max_steps=100, learning_rate=1e-2, eval_every=0, checkpoint_every=0, max_length=64))  # fmt: skip

    gen = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=64, seed=1)
    model, ptok = load_for_inference(str(root / "sft"), "fp32")
    candidates = generate_responses(model, ptok, [messages(p) for p in train_prompts[:150]], gen, num_samples=4, progress=False)
    ranked, reversed_ = [], []
    for prompt, group in zip(train_prompts, candidates):
        texts = list(dict.fromkeys(s.text for s in group if s.text))
        complete = {s.text for s in group if s.has_eos}
        best = [i for i, t in enumerate(texts) if gold(t) and t in complete]
        rest = [i for i in range(len(texts)) if i not in best]
        if best and rest:
            ranked.append(Comparison(messages(prompt), texts, [best, rest], source="scripted-annotator"))
            reversed_.append(Comparison(messages(prompt), texts, [rest, best], source="reversed"))
    write_jsonl(root / "comparisons.jsonl", [comparison_to_json(c) for c in ranked])
    write_jsonl(root / "reversed.jsonl", [comparison_to_json(c) for c in reversed_])
    return held_out, len(ranked)


def dpo_config(root: Path, out: str, **overrides):
    from rlhfkit.config import DPOConfig

    fields = dict(model=str(root / "sft"), data=str(root / "comparisons.jsonl"), output_dir=str(root / out), precision="fp32", batch_size=8,
                  max_steps=40, learning_rate=1e-3, warmup_ratio=0.0, beta=2.0, eval_fraction=0.15, eval_every=0,
                  checkpoint_every=0, max_length=64)  # fmt: skip
    fields.update(overrides)
    return DPOConfig(**fields)


def run_gold_experiment(root: Path, **overrides) -> dict:
    from rlhfkit.rl.dpo import ACCURACY_FILE, run_dpo
    from rlhfkit.training import read_metrics

    held_out, n = sft_and_rankings(root)
    run_dpo(dpo_config(root, "dpo", **overrides))
    run_dpo(dpo_config(root, "dpo_reversed", **{**overrides, "data": str(root / "reversed.jsonl")}))
    sft_share, sft_kl = gold_share_and_kl(root / "sft", root / "sft", held_out)
    dpo_share, dpo_kl = gold_share_and_kl(root / "dpo", root / "sft", held_out)
    reversed_share, _ = gold_share_and_kl(root / "dpo_reversed", root / "sft", held_out)
    train = [m for m in read_metrics(root / "dpo" / "metrics.jsonl") if m["phase"] == "train"]
    return {
        "comparisons": n, "sft_gold": sft_share, "dpo_gold": dpo_share, "reversed_gold": reversed_share,
        "sft_kl": sft_kl, "dpo_kl": dpo_kl, "first_loss": train[0]["loss"], "last_accuracy": train[-1]["accuracy"],
        "heldout": json.loads((root / "dpo" / ACCURACY_FILE).read_text()),
    }  # fmt: skip


@pytest.mark.parametrize("loss,beta", [("dpo", 2.0), ("ipo", 0.1)])
def test_dpo_raises_gold_score_within_kl_bound(tmp_path, loss, beta):
    r = run_gold_experiment(tmp_path, loss=loss, beta=beta)
    print(json.dumps({k: v for k, v in r.items() if k != "heldout"}, indent=1))
    assert r["comparisons"] >= 50
    # policy = reference at the start: log 2 per pair (DPO), (1 / (2 beta))^2 (IPO)
    assert r["first_loss"] == pytest.approx(0.6931 if loss == "dpo" else 1 / (2 * beta) ** 2, rel=0.01)
    assert r["sft_kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.05 <= r["sft_gold"] <= 0.4
    assert r["dpo_gold"] >= r["sft_gold"] + 0.3, r  # the annotator's word becomes much more frequent ...
    assert r["dpo_kl"] < KL_BOUND, r  # ... at a bounded KL from SFT
    assert r["reversed_gold"] < r["sft_gold"], r  # the reversed preference pushes the other way: the test can fail
    held = r["heldout"]  # the implicit reward ranks held-out comparisons like a reward model
    assert held["comparisons"] >= 5 and held["accuracy"] >= 0.8 and "length_baseline_accuracy" in held


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_rankings(tmp_path_factory, tiny_model_dir) -> Path:
    """K-wise rankings and pairs on tiny prompts (the word wins), and the tiny model standing in for SFT."""
    from rlhfkit.data import write_jsonl

    root = tmp_path_factory.mktemp("dpo-data")
    rng = random.Random(3)
    words = "yes no sure here the good apple river day".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))

    rows = [{"prompt": f"{sentence()} {i}", "responses": [sentence() + " banana", sentence(), sentence()], "ranking": [0, [1, 2]]} for i in range(24)]
    rows += [{"prompt": f"{sentence()} {i}", "chosen": sentence() + " banana", "rejected": sentence()} for i in range(24, 40)]
    write_jsonl(root / "comparisons.jsonl", rows)
    return root


def test_kill_and_resume_gives_the_same_weights(tmp_path, tiny_rankings, tiny_model_dir):
    from rlhfkit.rl.dpo import REFERENCE_FILE, run_dpo

    settings = dict(model=str(tiny_model_dir), data=str(tiny_rankings / "comparisons.jsonl"), max_steps=6, checkpoint_every=2, batch_size=4,
                    learning_rate=1e-3, eval_fraction=0.2)  # fmt: skip
    straight = dpo_config(tmp_path, "straight", **settings)
    run_dpo(straight)
    resumed = dpo_config(tmp_path, "resumed", **settings)
    run_dpo(resumed, stop_after=3)  # "killed" after step 3: the checkpoint of step 2 is the newest
    assert not (tmp_path / "resumed" / "final").exists() and (tmp_path / "resumed" / REFERENCE_FILE).exists()
    (tmp_path / "resumed" / REFERENCE_FILE).unlink()  # gone: recomputed from the SFT model, to the same numbers
    run_dpo(resumed)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    base = _weights_of_base(tiny_model_dir)
    moved = max((a[k] - base[k]).abs().max().item() for k in a if k in base and base[k].shape == a[k].shape)
    assert moved > 1e-3  # training changed the weights ...
    for k in a:
        assert torch.equal(a[k], b[k]), k  # ... and the resumed run ends exactly where the uninterrupted one does
    from rlhfkit.training import read_metrics

    steps = [m["step"] for m in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if m["phase"] == "train"]
    assert steps == list(range(1, 7))


def _weights_of_base(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_lora_reference_is_the_adapter_switched_off(tmp_path, tiny_rankings, tiny_model_dir, monkeypatch):
    """One base network: the SFT model is loaded once (the policy); the cached reference log-probs are the SFT
    model's; after training, the policy with its adapter off still gives them, with the adapter on it does not."""
    from safetensors.torch import load_file

    import rlhfkit.rl.dpo as dpo
    from rlhfkit.models import load_tokenizer

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    kept = {}
    real_make_optimizer = dpo.make_optimizer

    def make_optimizer(module, cfg):  # keeps the policy, to look at it after training
        kept["policy"] = module.model
        return real_make_optimizer(module, cfg)

    monkeypatch.setattr(dpo, "make_optimizer", make_optimizer)
    cfg = dpo_config(tmp_path, "lora", model=str(tiny_model_dir), data=str(tiny_rankings / "comparisons.jsonl"), max_steps=4,
                     batch_size=4, learning_rate=1e-2, eval_fraction=0.2, lora={"enabled": True, "r": 4, "alpha": 8})  # fmt: skip
    dpo.run_dpo(cfg)
    assert len(loads) == 1  # the policy only: no second copy for the reference

    tok = load_tokenizer(str(tiny_model_dir))
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    train, held, _ = dpo.load_preferences(cfg, tok)
    cached = load_file(str(tmp_path / "lora" / dpo.REFERENCE_FILE))["train"]
    seen = torch.isfinite(cached)  # 4 steps of 4 prompts: only the comparisons the run visits are computed
    assert 0 < seen.sum() < len(cached)
    sft = real_load(str(tiny_model_dir), tok).eval()
    assert torch.allclose(torch.cat(dpo.logprobs_of(dpo.ResponseLogprobs(sft), train, tok.pad_token_id, 4, acc))[seen], cached[seen], atol=1e-4)
    policy = kept["policy"]  # trained
    with policy.disable_adapter():
        off = torch.cat(dpo.logprobs_of(dpo.ResponseLogprobs(policy), train, tok.pad_token_id, 4, acc))
    on = torch.cat(dpo.logprobs_of(dpo.ResponseLogprobs(policy), train, tok.pad_token_id, 4, acc))
    assert torch.allclose(off[seen], cached[seen], atol=1e-4)
    assert (on - cached)[seen].abs().max() > 1e-2  # the adapter did learn something


if __name__ == "__main__":  # manual runs, e.g. to see it fail:  --learning_rate 1e-9
    import tempfile

    from rlhfkit.config import parse_overrides

    print(json.dumps(run_gold_experiment(Path(tempfile.mkdtemp(prefix="dpo-e2e-")), **parse_overrides(sys.argv[1:])), indent=1, default=str))


def test_every_dpo_config_field_is_documented_and_the_command_exists():
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.config import DPOConfig, PipelineDPOConfig, PipelineMethod

    for cls in (DPOConfig, PipelineDPOConfig, PipelineMethod):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
    doc = CliRunner().invoke(app, ["config-doc", "dpo"])
    assert doc.exit_code == 0 and "label_smoothing: 0.0" in doc.output and "loss: dpo" in doc.output
    assert CliRunner().invoke(app, ["dpo", "--help"]).exit_code == 0
    bad = CliRunner().invoke(app, ["dpo", "--loss", "kto"])
    assert bad.exit_code == 2 and "loss" in bad.output
