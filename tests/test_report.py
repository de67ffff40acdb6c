"""`rlhfkit report`: a self-contained HTML page from a run folder.

The run folder is fake (metrics.jsonl files, eval.json and eval_samples.jsonl written here), so no model is
trained. The page is checked as text (no external URL, escaped model output) and in headless Chromium
(images decoded, tables present, no script ran); a screenshot goes to test-artifacts/report.png.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from rlhfkit.report import build_report, render_report

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'

PROMPTS = [
    ("How do I keep bread fresh for longer?",
     "Put it in the fridge.",
     "Keep it in a bread box or a paper bag at room temperature, away from sunlight. Slice only what you eat, and "
     "freeze whatever you will not finish within two or three days; toast slices straight from the freezer."),
    ("Explain what a reward model is, in two sentences.",
     "A reward model is a model. It gives rewards.",
     "A reward model reads a prompt and a response and outputs a single number saying how much people would prefer "
     "that response. It is trained on human comparisons and then used to steer a policy with reinforcement learning."),
    ("Write a haiku about rain on a tin roof.",
     "Rain rain rain on the roof\nit is raining",
     "Drums on the tin roof,\nthe whole house hums with the storm -\nwarm tea, a slow book."),
    (f"Is this shown as text? {XSS}",
     f"Echo: {XSS}",
     "Yes: anything a model writes is escaped, so <b>tags</b> & entities stay text."),
]


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_fake_run(root: Path) -> Path:
    """A pipeline run folder as the steps leave it: metrics, configs, final/ markers, the evaluation."""
    rng = random.Random(0)
    run = root / "run"
    t = 1.7e9
    sft = []
    for step in range(1, 41):
        sft.append({"step": step, "phase": "train", "time": t + step, "loss": 2.2 * math.exp(-step / 30) + 0.9 + rng.gauss(0, 0.08),
                    "token_accuracy": 0.45 + 0.1 * (1 - math.exp(-step / 20)) + rng.gauss(0, 0.01)})
    for step in (0, 10, 20, 30, 40):
        sft.append({"step": step, "phase": "eval", "time": t + step, "loss": 2.0 * math.exp(-step / 35) + 1.05, "perplexity": 5.0})
    _jsonl(run / "sft" / "metrics.jsonl", sft)
    (run / "sft" / "final").mkdir(parents=True)
    (run / "sft" / "final" / "config.json").write_text("{}")
    (run / "sft" / "config.yaml").write_text("model: default\nlearning_rate: 5.0e-5\n")

    rm = []
    for step in range(1, 61):
        rm.append({"step": step, "phase": "train", "time": t + step, "loss": 0.69 - 0.12 * (1 - math.exp(-step / 25)) + rng.gauss(0, 0.04),
                   "accuracy": 0.5 + 0.15 * (1 - math.exp(-step / 25)) + rng.gauss(0, 0.05), "margin": step / 60})
    for step in (0, 20, 40, 60):
        rm.append({"step": step, "phase": "eval", "time": t + step, "loss": 0.69 - 0.08 * step / 60, "accuracy": 0.5 + 0.12 * step / 60})
    _jsonl(run / "reward" / "metrics.jsonl", rm)
    (run / "reward" / "final").mkdir(parents=True)
    (run / "reward" / "final" / "config.json").write_text("{}")
    (run / "reward" / "config.yaml").write_text("model: runs/x/sft\nmargin_scale: 0.0\n")

    ppo, beta = [], 0.05
    for it in range(1, 31):
        kl = 6.0 * (1 - math.exp(-it / 8)) + rng.gauss(0, 0.3)
        ppo.append({"step": it, "phase": "train", "time": t + it, "score": -0.3 + 0.9 * (1 - math.exp(-it / 10)) + rng.gauss(0, 0.08),
                    "score_penalised": -0.45 + 1.0 * (1 - math.exp(-it / 10)) + rng.gauss(0, 0.08), "kl": kl, "beta": beta,
                    "response_length": 48 - 10 * (1 - math.exp(-it / 12)) + rng.gauss(0, 1.5), "eos_share": min(1.0, 0.8 + it / 100),
                    "entropy": 1.9 - 0.4 * it / 30})
        beta *= 1 + max(-0.2, min(0.2, kl / 6 - 1)) * 16 / 1000
    _jsonl(run / "ppo" / "metrics.jsonl", ppo)
    (run / "ppo" / "config.yaml").write_text("policy_model: runs/x/sft\nadaptive_kl: true\ntarget_kl: 6.0\n")
    ckpt = run / "ppo" / "checkpoints" / "step-0000030"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 30, "total_steps": 30}))
    (run / "ppo" / "final").mkdir()
    (run / "ppo" / "final" / "config.json").write_text("{}")
    _jsonl(run / "pipeline_log.jsonl", [{"step": s, "event": "done", "seconds": sec} for s, sec in (("sft", 190), ("reward", 250), ("ppo", 520), ("evaluate", 95))])

    records = []
    for i, (prompt, a, b) in enumerate(PROMPTS):
        records.append({
            "index": i, "prompt": prompt,
            "messages": ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}] if i == 1 else [])
            + [{"role": "user", "content": prompt}],
            "sft": {"response": a, "score": -0.4 + 0.1 * i, "judge_score": -0.2, "length": 12, "has_eos": True, "kl_from_sft": 0.0},
            "rlhf": {"response": b, "score": 0.6 - 0.1 * i, "judge_score": 0.3, "length": 41, "has_eos": i != 2, "kl_from_sft": 4.2},
        })  # fmt: skip
    _jsonl(run / "eval" / "eval_samples.jsonl", records)
    acc = {"comparisons": 160, "pairs": 412, "accuracy": 0.634, "length_baseline_accuracy": 0.571, "mean_margin": 0.41,
           "by_source": {"hh-rlhf/helpful-base": {"pairs": 40, "accuracy": 0.65, "length_baseline_accuracy": 0.6, "mean_margin": 0.3},
                         "oasst": {"pairs": 372, "accuracy": 0.63, "length_baseline_accuracy": 0.57, "mean_margin": 0.42}}}
    ev = {
        "sft_model": "runs/x/sft/final", "rlhf_model": "runs/x/ppo/final", "reward_model": "runs/x/reward/final",
        "judge_reward_model": "runs/x/judge/final", "prompts": "runs/x/data/eval_prompts.jsonl", "n_prompts": 32,
        "generation": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "seed": 0}, "kl_temperature": 0.7,
        "policies": {
            "sft": {"score": -0.12, "score_std": 0.8, "judge_score": -0.05, "kl_from_sft": 0.0, "kl_from_sft_stderr": 0.0, "length": 51.3, "eos_share": 0.81},
            "rlhf": {"score": 0.47, "score_std": 0.7, "judge_score": 0.12, "kl_from_sft": 4.8, "kl_from_sft_stderr": 0.6, "length": 40.2, "eos_share": 0.94},
        },
        "win_rate": {
            "reward_model": {"rate": 0.72, "stderr": 0.08, "wins": 23, "ties": 0, "losses": 9, "score_delta": 0.59, "score_delta_stderr": 0.15},
            "judge": {"rate": 0.59, "stderr": 0.09, "wins": 19, "ties": 0, "losses": 13, "score_delta": 0.17, "score_delta_stderr": 0.12},
        },
        "length_controlled": {"reward_model": {"rate": 0.66, "stderr": 0.085, "length_slope": 0.4},
                              "judge": {"rate": 0.53, "stderr": 0.09, "length_slope": 0.3}},
        "agreement": {"rate": 0.71, "stderr": 0.08, "prompts": 31},
        "best_of_n": [
            {"n": 4, "kl_from_sft": 0.636, "length": 49.0, "eos_share": 0.84, "reward_model_score": 0.4, "judge_score": 0.05,
             "reward_model": {"rate": 0.81, "stderr": 0.06, "wins": 26, "ties": 0, "losses": 6, "score_delta": 0.5, "score_delta_stderr": 0.1},
             "judge": {"rate": 0.63, "stderr": 0.085, "wins": 20, "ties": 0, "losses": 12, "score_delta": 0.1, "score_delta_stderr": 0.07},
             "reward_model_length_controlled": {"rate": 0.8, "stderr": 0.07}, "judge_length_controlled": {"rate": 0.6, "stderr": 0.09}},
            {"n": 16, "kl_from_sft": 1.835, "length": 50.0, "eos_share": 0.8, "reward_model_score": 0.9, "judge_score": 0.2,
             "reward_model": {"rate": 0.94, "stderr": 0.04, "wins": 30, "ties": 0, "losses": 2, "score_delta": 1.0, "score_delta_stderr": 0.1},
             "judge": {"rate": 0.72, "stderr": 0.08, "wins": 23, "ties": 0, "losses": 9, "score_delta": 0.25, "score_delta_stderr": 0.08},
             "reward_model_length_controlled": {"rate": 0.93, "stderr": 0.05}, "judge_length_controlled": {"rate": 0.7, "stderr": 0.08}},
        ],
        "candidate_agreement": {"rate": 0.58, "pairs": 3840},
        "other_prompts": {
            "prompts": "examples/data/self_instruct_prompts.jsonl", "n_prompts": 30,
            "policies": {
                "sft": {"score": -0.2, "judge_score": 0.0, "kl_from_sft": 0.0, "kl_from_sft_stderr": 0.0, "length": 55.0, "eos_share": 0.7},
                "rlhf": {"score": 0.1, "judge_score": -0.05, "kl_from_sft": 5.1, "kl_from_sft_stderr": 0.7, "length": 44.0, "eos_share": 0.9},
            },
            "win_rate": {
                "reward_model": {"rate": 0.6, "stderr": 0.09, "wins": 18, "ties": 0, "losses": 12, "score_delta": 0.3, "score_delta_stderr": 0.2},
                "judge": {"rate": 0.43, "stderr": 0.09, "wins": 13, "ties": 0, "losses": 17, "score_delta": -0.05, "score_delta_stderr": 0.1},
            },
            "length_controlled": {"reward_model": {"rate": 0.58, "stderr": 0.09}, "judge": {"rate": 0.45, "stderr": 0.09}},
            "agreement": {"rate": 0.6, "stderr": 0.09, "prompts": 30},
        },
        "reward_model_accuracy": acc, "judge_accuracy": {**acc, "accuracy": 0.6, "by_source": {}}, "seconds": 95.0,
    }  # fmt: skip
    (run / "eval" / "eval.json").write_text(json.dumps(ev))
    return run


def test_report_is_self_contained_and_escaped(tmp_path):
    run = make_fake_run(tmp_path)
    out = render_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    assert not re.search(r"https?://", text), "no external URL"
    assert "<script" not in text and "onerror=\"" not in text  # the XSS strings are escaped
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 3  # SFT, reward model, PPO
    assert not re.search(r'src="(?!data:)', text)
    assert "Reward-model pairwise accuracy" in text and "hh-rlhf/helpful-base" in text


def _rows(text: str, table_class: str) -> list[list[str]]:
    """The cells of the body rows of <table class="table_class"> (unescaped)."""
    import html

    table = re.search(rf'<table class="{re.escape(table_class)}">(.*?)</table>', text, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)] for row in re.findall(r"<tr>(.*?)</tr>", table)]


def test_report_shows_the_judge_best_of_n_and_length_controlled_rows(tmp_path):
    text = build_report(make_fake_run(tmp_path))
    judge = _rows(text, "judge")
    assert judge[0] == ["RLHF vs SFT", "reward model (32 held-out)", "judge (32 held-out)",
                        "reward model (30 other-source)", "judge (30 other-source)"]  # fmt: skip
    rows = {r[0]: r[1:] for r in judge[1:]}
    # significant (0.22 from 0.5 is 2.75 standard errors) or not (0.09 is 1 standard error): marked
    assert rows["win rate of RLHF over SFT"] == ["0.720 ± 0.080", "0.590 ± 0.090 (n.s.)", "0.600 ± 0.090 (n.s.)", "0.430 ± 0.090 (n.s.)"]
    assert rows["length-controlled win rate"] == ["0.660 ± 0.085 (n.s.)", "0.530 ± 0.090 (n.s.)", "0.580 ± 0.090 (n.s.)", "0.450 ± 0.090 (n.s.)"]
    assert rows["paired score gain RLHF - SFT"][0] == "+0.590 ± 0.150"
    assert rows["wins / ties / losses"] == ["23 / 0 / 9", "19 / 0 / 13", "18 / 0 / 12", "13 / 0 / 17"]
    best = _rows(text, "best-of-n")
    assert best[0] == ["held-out prompts", "RLHF (PPO)", "best-of-4 of SFT", "best-of-16 of SFT"]
    rows = {r[0]: r[1:] for r in best[1:]}
    assert rows["KL from SFT (nats; best-of-n: log n - (n-1)/n)"] == ["4.80 ± 0.60", "0.64", "1.83"]
    assert rows["judge win rate over SFT"] == ["0.590 ± 0.090 (n.s.)", "0.630 ± 0.085 (n.s.)", "0.720 ± 0.080"]
    assert rows["judge win rate, length-controlled"] == ["0.530 ± 0.090 (n.s.)", "0.600 ± 0.090 (n.s.)", "0.700 ± 0.080"]
    assert "temperature 0.7, top_p 1.0, top_k 0, at most 64 new tokens, seed 0" in text
    assert "32 held-out prompts (runs/x/data/eval_prompts.jsonl), 30 other-source prompts" in text
    assert "(n.s.): less than 2 standard errors from no change" in text
    assert "prefer the same of SFT / RLHF on 0.710 ± 0.080 of 31 held-out prompts" in text
    # the cards: the judge's win rate is not significant, so it is not shown as a gain
    assert re.search(r'<div class="value ">59%</div><div class="label">win rate under the held-out judge ± 9% \(n.s.\)', text)
    assert re.search(r'<div class="value good">72%</div>', text)


def test_report_of_partial_runs(tmp_path):
    run = make_fake_run(tmp_path)
    for part in ("reward", "ppo", "eval"):
        for f in sorted((run / part).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (run / part).rmdir()
    text = build_report(run)
    assert text.count("data:image/png;base64,") == 1 and "Evaluation" not in text
    # a single step's run folder works too
    single = build_report(run / "sft")
    assert single.count("data:image/png;base64,") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Nothing to report yet" in build_report(empty)
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "missing")


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    run = make_fake_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run), "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").exists() and "r.html" in result.output


@pytest.mark.browser
def test_report_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from browser_utils import ARTIFACTS, launch_chromium

    run = make_fake_run(tmp_path)
    out = render_report(run)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.resolve().as_uri())
            images = page.eval_on_selector_all("img", "els => els.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert len(images) == 3 and all(ok and w > 300 and h > 100 for ok, w, h in images), images
            rows = page.eval_on_selector_all("table.eval tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
            assert rows[0][0].startswith("reward-model score") and len(rows) >= 5
            assert any(r[0] == "KL from SFT (nats / response)" for r in rows)
            assert page.evaluate("() => window.__pwned") is None
            assert XSS in page.inner_text("main")  # shown as text
            assert page.locator(".response.winner").count() >= 3
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            assert not problems, problems
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
