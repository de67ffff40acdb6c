"""`rlhfkit report RUN_DIR`: one self-contained HTML page about a pipeline run.

The page (RUN_DIR/report.html) holds: the steps and their status, the evaluation (the SFT vs RLHF table; RLHF vs
SFT under the reward model and under the judge, raw and length-controlled, on the held-out and the other-source
prompts; best-of-n of SFT beside PPO with its KL; the sampling settings; every estimate under 2 standard errors
from no change marked "(n.s.)"; the reward model's held-out accuracy), the training curves of every step that exists (SFT train/eval loss;
reward model loss and accuracy; PPO score, KL, beta, response length, EOS share and entropy per iteration),
and sample prompts with the SFT and RLHF responses side by side with their scores.

Self-contained: the plots are PNGs (matplotlib, Agg backend) embedded as base64 data URLs, the CSS is inline,
there is no script and no external URL; a Content-Security-Policy meta tag forbids loading anything else.
Every text from the run (prompts, responses, paths) is HTML-escaped: model output cannot inject markup.

RUN_DIR is a pipeline run folder (sub-folders sft/, reward/, judge/, ppo/, eval/ - or those named in its
pipeline.resolved.yaml), or a single step's run folder.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Iterable

import yaml

from .report_plots import plot_ppo, plot_reward, plot_sft
from .training import RunDir, read_metrics

STEP_TITLES = {"sft": "SFT", "reward": "Reward model", "judge": "Judge reward model", "ppo": "PPO"}

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d0d4d9; --bg:#f6f7f9; --card:#fff; --accent:#1a5fb4; --good:#26734d; --bad:#a51d2d; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI","DejaVu Sans",sans-serif; color:var(--fg); background:var(--bg); }
header { background:var(--card); border-bottom:1px solid var(--line); padding:0.9rem 1.5rem; }
header h1 { margin:0; font-size:1.3rem; }
header .muted { margin-top:0.2rem; }
main { max-width:72rem; margin:0 auto; padding:0.5rem 1.5rem 3rem; }
h2 { font-size:1.1rem; margin:1.6rem 0 0.6rem; }
h3 { font-size:0.98rem; margin:1rem 0 0.4rem; }
.muted { color:var(--muted); font-size:0.88rem; }
.cards { display:flex; flex-wrap:wrap; gap:0.8rem; margin-top:1rem; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:0.6rem 1rem; min-width:11rem; }
.card .value { font-size:1.5rem; font-weight:650; }
.card .label { color:var(--muted); font-size:0.82rem; }
.good { color:var(--good); } .bad { color:var(--bad); }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:6px; }
th, td { padding:0.35rem 0.8rem; border-bottom:1px solid var(--line); text-align:right; font-variant-numeric:tabular-nums; }
th:first-child, td:first-child { text-align:left; }
thead th { background:#eef1f5; font-weight:600; }
figure { margin:0.4rem 0 1rem; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:0.4rem; }
figure img { display:block; width:100%; height:auto; }
figcaption { color:var(--muted); font-size:0.85rem; padding:0.2rem 0.4rem; }
.sample { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:0.7rem 0.9rem; margin:0 0 1rem; }
.prompt { white-space:pre-wrap; overflow-wrap:anywhere; font-weight:600; margin-bottom:0.5rem; }
.context { white-space:pre-wrap; overflow-wrap:anywhere; color:var(--muted); font-size:0.88rem; }
.pair { display:grid; grid-template-columns:1fr 1fr; gap:0.8rem; }
.response { border:1px solid var(--line); border-radius:6px; padding:0.5rem 0.7rem; background:#fbfbfc; }
.response.winner { border-color:var(--good); box-shadow:inset 3px 0 0 var(--good); }
.response .head { display:flex; justify-content:space-between; gap:0.5rem; font-size:0.82rem; color:var(--muted); margin-bottom:0.3rem; }
.response .head b { color:var(--fg); }
.text { white-space:pre-wrap; overflow-wrap:anywhere; }
code { font-size:0.85rem; }
@media (max-width: 50rem) { .pair { grid-template-columns:1fr; } }
"""


# ----------------------------------------------------------------------------- finding the parts


def _step_dirs(run: Path) -> tuple[dict[str, Path], Path | None]:
    """Folders of the training steps that exist, and of the evaluation (or None)."""
    resolved = run / "pipeline.resolved.yaml"
    names = {"sft": run / "sft", "reward": run / "reward", "judge": run / "judge", "ppo": run / "ppo"}
    eval_dir = run / "eval"
    if resolved.exists():
        configs = yaml.safe_load(resolved.read_text()) or {}
        for name, c in configs.items():  # the steps of the run, step-3 methods included (`methods:`)
            if name != "evaluate" and isinstance(c, dict) and c.get("output_dir"):
                names[name] = Path(c["output_dir"])
        if configs.get("evaluate", {}).get("output_dir"):
            eval_dir = Path(configs["evaluate"]["output_dir"])
    steps = {name: d for name, d in names.items() if (d / "metrics.jsonl").exists() or (d / "final").exists()}
    if not steps and (run / "metrics.jsonl").exists():  # a single step's run folder
        steps = {_kind_of(run): run}
    if not (eval_dir / "eval.json").exists():
        eval_dir = run if (run / "eval.json").exists() else None
    return steps, eval_dir


def _kind_of(run: Path) -> str:
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    cfg = cfg or {}
    if "policy_model" in cfg:
        return "ppo"
    if "label_smoothing" in cfg:
        return "dpo"
    if "margin_scale" in cfg:
        return "reward"
    if cfg:
        return "sft"
    keys = {k for m in read_metrics(run / "metrics.jsonl") for k in m}
    return "ppo" if "kl" in keys else "reward" if "accuracy" in keys else "sft"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                pass
    return out


# ----------------------------------------------------------------------------- HTML pieces


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(b64: str, alt: str, caption: str) -> str:
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{b64}"><figcaption>{_e(caption)}</figcaption></figure>'


def _step_status(name: str, folder: Path, metrics: list[dict], costs: dict[str, dict]) -> list[str]:
    run = RunDir(folder)
    train_steps = [m["step"] for m in metrics if m.get("phase", "train") == "train"]
    last = max(train_steps, default=0)
    total = None
    latest = run.latest_checkpoint()
    if latest is not None:
        try:
            total = json.loads((latest / "trainer_state.json").read_text()).get("total_steps")
        except (OSError, ValueError):
            total = None
    status = "done" if run.is_done() else "not finished"
    progress = f"{last}" + (f" / {total}" if total else "")
    seconds = (costs.get(name) or {}).get("seconds")
    return [STEP_TITLES.get(name, name), status, progress, f"{seconds / 60:.1f} min" if seconds else "—", str(folder)]


def _tone(x, neutral: float = 0.0, error=None) -> str:
    """CSS class of a number: green above `neutral`, red below; with a standard error, only when the gap is at
    least 2 of them."""
    from .stats import significant

    if x is None or x == neutral or (error is not None and not significant(x, error, neutral)):
        return ""
    return "good" if x > neutral else "bad"


def _cards(ev: dict) -> str:
    from .eval_tables import NOT_SIGNIFICANT
    from .stats import significant

    def rate_card(w: dict | None, label: str):
        if not w:
            return None
        ns = f" {NOT_SIGNIFICANT}" if significant(w.get("rate"), w.get("stderr"), 0.5) is False else ""
        return (f"{_num(w.get('rate'), '.0%')}", f"{label} ± {_num(w.get('stderr'), '.0%')}{ns}", _tone(w.get("rate"), 0.5, w.get("stderr")))

    wr = ev["win_rate"]["reward_model"]
    rl, sft = ev["policies"]["rlhf"], ev["policies"]["sft"]
    delta = (rl.get("score") or 0) - (sft.get("score") or 0) if rl.get("score") is not None and sft.get("score") is not None else None
    lc = ev.get("length_controlled") or {}
    other = ev.get("other_prompts") or {}
    cards = [
        rate_card(wr, "RLHF win rate over SFT (reward model)"),
        rate_card(ev["win_rate"].get("judge"), "win rate under the held-out judge"),
        rate_card(lc.get("judge"), "judge win rate, length-controlled"),
        rate_card((other.get("win_rate") or {}).get("judge"), "judge win rate, other-source prompts"),
        (f"{_num(delta, '+.2f')}", f"score change, {_num(sft.get('score'), '.2f')} → {_num(rl.get('score'), '.2f')}",
         _tone(wr.get("score_delta"), 0.0, wr.get("score_delta_stderr"))),
        (f"{_num(rl.get('kl_from_sft'), '.2f')}", "KL from SFT (nats / response)", ""),
    ]
    acc = ev.get("reward_model_accuracy")
    if acc:
        cards.append((f"{_num(acc.get('accuracy'), '.0%')}", "reward-model accuracy on held-out pairs", ""))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value {cls}">{_e(v)}</div><div class="label">{_e(label)}</div></div>'
        for v, label, cls in (c for c in cards if c)
    ) + "</div>"


def _accuracy_table(ev: dict) -> str:
    rows = []
    for name, key in (("reward model", "reward_model_accuracy"), ("judge", "judge_accuracy")):
        acc = ev.get(key)
        if not acc:
            continue
        rows.append([f"{name}: all", str(acc.get("pairs")), _num(acc.get("accuracy")), _num(acc.get("length_baseline_accuracy")), _num(acc.get("mean_margin"))])
        for source, m in (acc.get("by_source") or {}).items():
            rows.append([f"  {source}", str(m.get("pairs")), _num(m.get("accuracy")), _num(m.get("length_baseline_accuracy")), _num(m.get("mean_margin"))])
    if not rows:
        return ""
    return "<h3>Reward-model pairwise accuracy on held-out comparisons</h3>" + _table(
        ["subset", "pairs", "accuracy", "longer-response baseline", "mean margin"], rows
    )


def _response_box(title: str, r: dict, other: dict, judge: bool) -> str:
    win = r.get("score") is not None and other.get("score") is not None and r["score"] > other["score"]
    bits = [f"score {_num(r.get('score'), '+.2f')}"]
    if judge and r.get("judge_score") is not None:
        bits.append(f"judge {_num(r.get('judge_score'), '+.2f')}")
    bits.append(f"{r.get('length', '?')} tokens" + ("" if r.get("has_eos", True) else ", no EOS"))
    return (
        f'<div class="response{" winner" if win else ""}"><div class="head"><b>{_e(title)}</b>'
        f"<span>{_e(' · '.join(bits))}</span></div>"
        f'<div class="text">{_e(r.get("response", ""))}</div></div>'
    )


def _conversation(messages: list[dict], prompt: str) -> str:
    context = messages[:-1] if messages else []
    out = ""
    if context:
        turns = "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in context)
        out += f'<details><summary class="muted">earlier turns ({len(context)})</summary><div class="context">{_e(turns)}</div></details>'
    return out + f'<div class="prompt">{_e(prompt)}</div>'


def _samples(records: list[dict], n: int, judge: bool, methods: list[str]) -> str:
    parts = []
    for r in records[:n]:
        sft = r.get("sft", {})
        boxes = [_response_box(name.upper() if name == "rlhf" else name, r.get(name, {}), sft, judge) for name in methods or ["rlhf"]]
        parts.append(
            '<div class="sample">' + _conversation(r.get("messages") or [], r.get("prompt", ""))
            + '<div class="pair">' + _response_box("SFT", sft, r.get((methods or ["rlhf"])[0], {}), judge) + "".join(boxes) + "</div></div>"
        )  # fmt: skip
    return "".join(parts)


def _ppo_samples(records: list[dict], n: int) -> str:
    if not records:
        return ""
    last = max(r.get("iteration", 0) for r in records)
    chosen = [r for r in records if r.get("iteration") == last][:n]
    parts = [f"<h3>PPO rollouts at iteration {_e(last)}</h3>"]
    for r in chosen:
        head = f"score {_num(r.get('score'), '+.2f')} · KL {_num(r.get('kl'), '.2f')} · {r.get('length', '?')} tokens"
        parts.append(
            '<div class="sample">' + _conversation(r.get("messages") or [], r.get("prompt", ""))
            + f'<div class="response"><div class="head"><b>policy</b><span>{_e(head)}</span></div>'
            + f'<div class="text">{_e(r.get("response", ""))}</div></div></div>'
        )  # fmt: skip
    return "".join(parts)


# ----------------------------------------------------------------------------- the page


def build_report(run_dir: str | Path, max_samples: int = 8) -> str:
    """The HTML text of the report of `run_dir`."""
    from .eval_tables import (
        SIGNIFICANCE_NOTE,
        accuracy_line,
        agreement_lines,
        best_of_n_table,
        judge_table,
        method_view,
        methods_table,
        policy_rows,
        sampling_line,
    )

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    steps, eval_dir = _step_dirs(run)
    from .pipeline import step_costs

    costs = step_costs(run)
    metrics = {name: read_metrics(d / "metrics.jsonl") for name, d in steps.items()}
    body: list[str] = []

    ev = json.loads((eval_dir / "eval.json").read_text()) if eval_dir else None
    methods = list((ev or {}).get("methods") or {})
    if ev and not methods:
        body.append(_cards(ev))
    if steps:
        rows = [_step_status(name, d, metrics[name], costs) for name, d in steps.items()]
        if ev:
            seconds = (costs.get("evaluate") or {}).get("seconds")
            rows.append(["Evaluation", "done", f"{ev.get('n_prompts')} prompts", f"{seconds / 60:.1f} min" if seconds else "—", str(eval_dir)])
        body.append("<h2>Steps</h2>" + _table(["step", "status", "steps logged", "time", "folder"], rows))

    if ev and methods:
        body.append(f"<h2>Step-3 methods against the same SFT responses on {_e(ev.get('n_prompts'))} held-out prompts</h2>")
        body.append(_table(*methods_table(ev, costs), "methods"))
    for name in methods or ([None] if ev else []):  # each method's own tables (folded when there are several)
        view = method_view(ev, name) if name else ev
        label = name or "RLHF"
        body.append(f"<details><summary><b>{_e(name)}</b>: its tables</summary>" if name else "")
        body.append(f"<h2>Evaluation: SFT vs {_e(label)} on {_e(ev.get('n_prompts'))} held-out prompts</h2>")
        body.append(_table(*policy_rows(view), "eval"))
        body.append(f"<h3>{_e(label)} vs SFT under the reward model and under the judge</h3>")
        body.append(_table(*judge_table(view), "judge"))
        if ev.get("best_of_n"):  # without best-of-n the PPO column repeats the judge table
            body.append(f"<h3>Best-of-n of SFT beside {_e(name or 'PPO')}</h3>")
            body.append(_table(*best_of_n_table(view), "best-of-n"))
        body.append("</details>" if name else "")
    if ev:
        notes = [sampling_line(ev), SIGNIFICANCE_NOTE, *agreement_lines(ev),
                 "KL = mean over RLHF's responses of the summed per-token log-ratio log π_RLHF − log π_SFT; "
                 "best-of-n's is log n − (n−1)/n. The length-controlled win rate is a logistic regression of the "
                 "outcome on the length difference, read at zero difference."]  # fmt: skip
        for name, key in (("reward model", "reward_model_accuracy"), ("judge", "judge_accuracy")):
            line = accuracy_line(name, ev.get(key))
            if line:
                notes.append(line + ".")
        body.append("".join(f'<p class="muted">{_e(n)}</p>' for n in notes))
        body.append(_accuracy_table(ev))

    if steps:
        body.append("<h2>Training curves</h2>")
        for name, folder in steps.items():
            m = metrics[name]
            config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
            kind = name if name in STEP_TITLES else _kind_of(folder)
            if kind == "sft":
                img = plot_sft(m)
                caption = "SFT: cross-entropy on response tokens per optimiser step (train) and on held-out demonstrations."
            elif kind in ("reward", "judge"):
                img = plot_reward(m)
                caption = f"{STEP_TITLES[name]}: pairwise loss and accuracy on training batches and on held-out comparisons."
            elif kind == "dpo":
                img = plot_reward(m)
                caption = f"{name} (DPO): loss, implicit-reward accuracy and margin on training batches and on held-out comparisons."
            else:
                img = plot_ppo(m, config or {})
                caption = "PPO, per iteration: mean reward-model score of the rollouts, KL from the SFT policy, beta, response length, EOS share, entropy."
            title = STEP_TITLES.get(name, name)
            body.append(f"<h3>{_e(title)}</h3>")
            body.append(_img(img, f"{title} training curves", caption) if img else '<p class="muted">no metrics logged yet</p>')

    if eval_dir:
        records = _read_jsonl(eval_dir / "eval_samples.jsonl")
        if records:
            body.append(f"<h2>Samples: the first {min(max_samples, len(records))} held-out prompts</h2>")
            body.append('<p class="muted">A response scoring higher than SFT\'s (SFT\'s: than the first method\'s) is outlined in green.</p>')
            body.append(_samples(records, max_samples, bool(ev and ev["win_rate"].get("judge")), methods))
    elif "ppo" in steps:
        body.append(_ppo_samples(_read_jsonl(steps["ppo"] / "samples.jsonl"), 4))

    if not body:
        body.append('<p class="muted">Nothing to report yet: no step has logged metrics.</p>')
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    title = f"rlhfkit report: {run.resolve().name}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><div class=\"muted\">{_e(str(run))} · generated {_e(when)}</div></header>"
        f"<main>{''.join(body)}</main></body></html>\n"
    )


def render_report(run_dir: str | Path, output: str | Path | None = None, max_samples: int = 8) -> Path:
    """Write the report (default RUN_DIR/report.html) and return its path."""
    text = build_report(run_dir, max_samples)
    out = Path(output) if output else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["build_report", "render_report"]
