"""`rlhfkit evaluate` on tiny random models: log-probs, KL, win rates, the outputs and the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.config import EvaluateConfig, GenerationSettings
from rlhfkit.evaluate import evaluate_policies, response_logprobs, run_evaluate, win_rate

from conftest import WORDS, build_tiny_model


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A second tiny policy (other weights, same tokenizer), a reward model and a judge, and data."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import build_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("eval-models")
    other = root / "other"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("model", "config", "generation_config")):
            shutil.copy(f, other / f.name)
    tok = load_tokenizer(str(tiny_model_dir))
    build_tiny_model(other, vocab_size=len(tok), seed=1)
    out = {"sft": tiny_model_dir, "rlhf": other}
    for name, seed in (("rm", 2), ("judge", 3)):
        torch.manual_seed(seed)
        rm = build_reward_model(str(tiny_model_dir), tok)
        stats = {"mean": 0.1, "std": 2.0, "max_length": 64, "max_prompt_share": 0.5, "precision": "fp32"}
        out[name] = save_reward_model(rm, tok, root / name, stats)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i : i + 5 + i % 4])}) + "\n" for i in range(0, 60, 6)))
    comparisons = root / "comparisons.jsonl"
    comparisons.write_text(
        "".join(json.dumps({"prompt": f"{WORDS[i]} {WORDS[i + 1]}", "chosen": " ".join(WORDS[i : i + 6]), "rejected": WORDS[i + 2]}) + "\n" for i in range(12))
    )
    out["prompts"], out["comparisons"] = prompts, comparisons
    return out


def config(models, tmp_path, **fields) -> EvaluateConfig:
    base = dict(
        output_dir=str(tmp_path / "eval"),
        sft_model=str(models["sft"]),
        rlhf_model=str(models["rlhf"]),
        reward_model=str(models["rm"]),
        prompts=str(models["prompts"]),
        comparisons=str(models["comparisons"]),
        max_prompts=6,
        batch_size=4,
        precision="fp32",
        generation=GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=1.0, batch_size=4),
    )
    return EvaluateConfig(**{**base, **fields})


def test_response_logprobs_match_a_plain_forward(tiny_model_dir):
    """Batched (left-padded prompts, right-padded responses) = one unpadded sequence at a time."""
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tok).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() + [tok.eos_token_id] for n in (4, 1, 7)]
    got = response_logprobs(model, prompts, responses, tok.pad_token_id, temperature=0.7, batch_size=3)
    for p, r, value in zip(prompts, responses, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float() / 0.7
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum().item()
        assert value == pytest.approx(want, abs=1e-4)


def test_win_rate_counts_ties_half():
    w = win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0])
    assert (w["rate"], w["wins"], w["ties"], w["losses"]) == (0.625, 2, 1, 1)
    assert w["score_delta"] == pytest.approx(1.0) and w["stderr"] > 0


def test_a_model_against_itself(models, tmp_path):
    metrics, records = evaluate_policies(config(models, tmp_path, rlhf_model=str(models["sft"])), progress=False)
    sft, rl = metrics["policies"]["sft"], metrics["policies"]["rlhf"]
    assert sft["kl_from_sft"] == 0.0 and rl["kl_from_sft"] == 0.0  # exactly: same weights, same samples
    assert all(r["rlhf"]["kl_from_sft"] == 0.0 for r in records)
    assert metrics["win_rate"]["reward_model"]["rate"] == 0.5 and metrics["win_rate"]["reward_model"]["ties"] == 6
    assert sft["score"] == rl["score"] and sft["length"] == rl["length"]


def test_two_models_with_a_judge_and_the_command(models, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    cfg = config(models, tmp_path, judge_reward_model=str(models["judge"]))
    path = run_evaluate(cfg)
    ev = json.loads(path.read_text())
    records = [json.loads(l) for l in (tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()]
    assert ev["n_prompts"] == 6 and len(records) == 6
    for name in ("sft", "rlhf"):
        p = ev["policies"][name]
        for key in ("score", "judge_score", "kl_from_sft", "length", "eos_share"):
            assert math.isfinite(p[key]), (name, key)
        assert 0 <= p["eos_share"] <= 1 and 1 <= p["length"] <= 10
    for judge in ("reward_model", "judge"):
        w = ev["win_rate"][judge]
        assert 0 <= w["rate"] <= 1 and w["wins"] + w["ties"] + w["losses"] == 6
    assert ev["policies"]["rlhf"]["kl_from_sft"] > 0  # another random model: clearly not the SFT distribution
    for key in ("reward_model_accuracy", "judge_accuracy"):
        assert ev[key]["pairs"] == 12 and 0 <= ev[key]["accuracy"] <= 1
    r = records[0]
    assert r["prompt"] and set(r["sft"]) >= {"response", "score", "judge_score", "length", "has_eos", "kl_from_sft"}
    # scores are normalised with the reward model's stats: the mean of the records is the reported mean
    assert ev["policies"]["rlhf"]["score"] == pytest.approx(sum(x["rlhf"]["score"] for x in records) / 6)

    out = tmp_path / "cli"
    args = ["evaluate", "--sft_model", str(models["sft"]), "--rlhf_model", str(models["rlhf"]), "--reward_model", str(models["rm"]),
            "--prompts", str(models["prompts"]), "--output_dir", str(out), "--max_prompts", "3", "--generation.max_new_tokens", "6",
            "--precision", "fp32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SFT vs RLHF on 3 held-out prompts" in result.output and "KL from SFT" in result.output
    assert json.loads((out / "eval.json").read_text())["reward_model_accuracy"] is None  # no comparisons given
