"""`rlhfkit evaluate` on tiny random models: log-probs, KL, win rates under the reward model and a judge, best-of-n,
the other-source prompt set, the outputs, the tables and the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.config import EvaluateConfig, GenerationSettings
from rlhfkit.evaluate import evaluate_policies, response_logprobs, run_evaluate
from rlhfkit.stats import best_of_n_kl, win_rate

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
        best_of_n=[],
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


def test_a_model_against_itself(models, tmp_path):
    metrics, records = evaluate_policies(config(models, tmp_path, rlhf_model=str(models["sft"])), progress=False)
    records = records["heldout"]
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
            "--judge", str(models["judge"]), "--prompts", str(models["prompts"]), "--output_dir", str(out), "--max_prompts", "3",
            "--generation.max_new_tokens", "6", "--precision", "fp32", "--best_of_n", "[2]"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # wide enough that rich wraps no cell
    assert result.exit_code == 0, result.output
    for text in ("SFT vs RLHF on 3 held-out prompts", "KL from SFT", "under the reward model and under the judge",
                 "length-controlled", "best-of-2 of SFT", "temperature 0.7", "(n.s.)"):  # fmt: skip
        assert text in result.output, text
    cli_ev = json.loads((out / "eval.json").read_text())
    assert cli_ev["reward_model_accuracy"] is None  # no comparisons given
    assert cli_ev["judge_reward_model"] == str(models["judge"]) and cli_ev["win_rate"]["judge"] is not None


def test_best_of_n_keeps_the_reward_models_favourite_and_reports_its_kl(models, tmp_path):
    cfg = config(models, tmp_path, judge_reward_model=str(models["judge"]), best_of_n=[4, 2], max_prompts=5)
    metrics, records = evaluate_policies(cfg, progress=False)
    rows = {b["n"]: b for b in metrics["best_of_n"]}
    assert sorted(rows) == [2, 4]
    for n, row in rows.items():
        assert row["kl_from_sft"] == pytest.approx(math.log(n) - (n - 1) / n) == pytest.approx(best_of_n_kl(n))
        kept = []
        for r in records["heldout"]:
            candidates = r["best_of_n"]["candidates"]
            assert len(candidates) == 4  # max(n), sampled once; each n uses the first n
            j = r["best_of_n"]["chosen"][str(n)]
            assert j < n and candidates[j]["score"] == max(c["score"] for c in candidates[:n])  # the RM's favourite
            kept.append(candidates[j])
        # and it is compared with the SFT response under the judge, as RLHF is
        want = win_rate([c["judge_score"] for c in kept], [r["sft"]["judge_score"] for r in records["heldout"]])
        assert row["judge"] == pytest.approx(want)
        assert row["reward_model_score"] == pytest.approx(sum(c["score"] for c in kept) / 5)
        assert row["length"] == pytest.approx(sum(c["length"] for c in kept) / 5)
        assert 0 <= row["judge_length_controlled"]["rate"] <= 1
    # the candidates are new samples (another seed), not copies of the SFT response
    assert any(r["best_of_n"]["candidates"][0]["response"] != r["sft"]["response"] for r in records["heldout"])


def test_other_source_prompts_get_their_own_column(models, tmp_path):
    from rlhfkit.eval_tables import judge_table, policy_rows

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"{WORDS[i]} {WORDS[i + 7]} please"}) + "\n" for i in range(4)))
    cfg = config(models, tmp_path, judge_reward_model=str(models["judge"]), other_prompts=str(other))
    path = run_evaluate(cfg, print_table=False)
    ev = json.loads(path.read_text())
    o = ev["other_prompts"]
    assert o["n_prompts"] == 4 and o["prompts"] == str(other)
    for role in ("reward_model", "judge"):
        assert o["win_rate"][role]["wins"] + o["win_rate"][role]["ties"] + o["win_rate"][role]["losses"] == 4
        assert 0 <= o["length_controlled"][role]["rate"] <= 1
    assert ev["policies"]["rlhf"]["kl_from_sft"] > 0 and o["policies"]["rlhf"]["kl_from_sft"] > 0
    samples = [json.loads(l) for l in (tmp_path / "eval" / "eval_samples_other.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [f"{WORDS[i]} {WORDS[i + 7]} please" for i in range(4)]
    header, rows = judge_table(ev)
    assert header == ["RLHF vs SFT", "reward model (6 held-out)", "judge (6 held-out)",
                      "reward model (4 other-source)", "judge (4 other-source)"]  # fmt: skip
    assert [r[0] for r in rows] == ["win rate of RLHF over SFT", "length-controlled win rate", "paired score gain RLHF - SFT", "wins / ties / losses"]
    w = o["win_rate"]["judge"]
    assert rows[3][4] == f"{w['wins']} / {w['ties']} / {w['losses']}"
    assert policy_rows(ev)[0] == ["metric", "SFT", "RLHF", "SFT, other source", "RLHF, other source"]


def test_tables_mark_gains_under_two_standard_errors():
    from rlhfkit.eval_tables import best_of_n_table, judge_table

    def wr(rate, se, delta, dse):
        return {"rate": rate, "stderr": se, "wins": 1, "ties": 0, "losses": 1, "score_delta": delta, "score_delta_stderr": dse}

    policy = {"score": 0.0, "judge_score": 0.0, "kl_from_sft": 2.0, "kl_from_sft_stderr": 0.2, "length": 40.0, "eos_share": 0.5}
    ev = {
        "n_prompts": 128, "policies": {"sft": policy, "rlhf": policy},
        "win_rate": {"reward_model": wr(0.70, 0.04, 0.5, 0.1), "judge": wr(0.56, 0.04, 0.10, 0.06)},
        "length_controlled": {"reward_model": {"rate": 0.52, "stderr": 0.04}, "judge": {"rate": 0.61, "stderr": 0.05}},
        "best_of_n": [{"n": 4, "kl_from_sft": best_of_n_kl(4), "length": 41.0, "eos_share": 0.6, "reward_model": wr(0.8, 0.03, 1.0, 0.1),
                       "judge": wr(0.59, 0.04, 0.2, 0.08), "judge_length_controlled": {"rate": 0.57, "stderr": 0.045}}],
    }  # fmt: skip
    _, rows = judge_table(ev)
    assert rows[0][1:] == ["0.700 ± 0.040", "0.560 ± 0.040 (n.s.)"]  # 0.06 from 0.5 is 1.5 standard errors
    assert rows[1][1:] == ["0.520 ± 0.040 (n.s.)", "0.610 ± 0.050"]
    assert rows[2][1:] == ["+0.500 ± 0.100", "+0.100 ± 0.060 (n.s.)"]
    header, rows = best_of_n_table(ev)
    assert header == ["held-out prompts", "RLHF (PPO)", "best-of-4 of SFT"]
    assert [r[2] for r in rows] == ["0.64", "0.590 ± 0.040", "0.570 ± 0.045 (n.s.)", "+0.200 ± 0.080", "0.800 ± 0.030", "41.0", "60%"]
    assert rows[0][1] == "2.00 ± 0.20" and rows[1][1] == "0.560 ± 0.040 (n.s.)"
