"""The tables of an evaluation (eval.json), as plain rows of text shared by the terminal (`print_eval_table`) and
the HTML report:

* `policy_rows`: per policy (and prompt set): mean scores, KL from SFT, length, EOS share;
* `judge_table`: RLHF vs SFT side by side under the reward model and under the judge (and on the other-source
  prompts): win rate, length-controlled win rate, paired score gain, wins / ties / losses;
* `best_of_n_table`: best-of-n of SFT beside PPO, each with its KL from SFT, under the judge and the reward model;
* `methods_table` (an evaluation of several step-3 methods, eval.json's `methods`): one row per method on the same
  held-out prompts under the same judge: win rate over SFT, paired gain with its standard error, KL, length, held-out
  pairwise accuracy, and (from the pipeline's log) training time and peak memory. `method_view` gives one method's
  block in the shape the other tables read.

An estimate less than 2 standard errors from no change (a win rate of 0.5, a gain of 0) is marked "(n.s.)".
"""

from __future__ import annotations

import math

from .stats import significant

NOT_SIGNIFICANT = "(n.s.)"
SIGNIFICANCE_NOTE = "(n.s.): less than 2 standard errors from no change (a win rate of 0.5, a score gain of 0)."
ROLES = (("reward_model", "reward model"), ("judge", "judge"))


def fmt(x, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def estimate(value, error, null: float, spec: str = ".3f") -> str:
    """'value ± stderr', marked (n.s.) when under 2 standard errors from `null`."""
    if value is None:
        return "—"
    text = f"{fmt(value, spec)} ± {fmt(error, spec.lstrip('+'))}"
    return f"{text} {NOT_SIGNIFICANT}" if significant(value, error, null) is False else text


def _sets(metrics: dict) -> list[tuple[str, dict]]:
    """(column suffix, metrics of the prompt set): the held-out set, then the other-source set if any."""
    out = [("", metrics)]
    if metrics.get("other_prompts"):
        out.append((", other source", metrics["other_prompts"]))
    return out


def policy_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): metric, then SFT and RLHF for each prompt set."""
    sets = _sets(metrics)
    header = ["metric"] + [f"{policy}{suffix}" for suffix, _ in sets for policy in ("SFT", "RLHF")]

    def row(label, cell):
        return [label] + [cell(m["policies"][p], p) for _, m in sets for p in ("sft", "rlhf")]

    rows = [row("reward-model score (normalised, mean)", lambda p, _: fmt(p.get("score")))]
    if metrics["win_rate"].get("judge"):
        rows.append(row("judge score (normalised, mean)", lambda p, _: fmt(p.get("judge_score"))))
    rows.append(row("KL from SFT (nats / response)",
                    lambda p, name: fmt(p["kl_from_sft"]) if name == "sft" else f"{fmt(p['kl_from_sft'])} ± {fmt(p['kl_from_sft_stderr'])}"))  # fmt: skip
    rows.append(row("response length (tokens, mean)", lambda p, _: fmt(p["length"], ".1f")))
    rows.append(row("responses ending with EOS", lambda p, _: fmt(p["eos_share"], ".0%")))
    return header, rows


def eval_rows(metrics: dict) -> list[list[str]]:
    """The rows of `policy_rows` (kept for callers of the one-table version)."""
    return policy_rows(metrics)[1]


def judge_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): RLHF vs SFT under the reward model and under the judge, per prompt set."""
    sets = _sets(metrics)
    columns = [(m, role, f"{title} ({m['n_prompts']}{' other-source' if suffix else ' held-out'})")
               for suffix, m in sets for role, title in ROLES]  # fmt: skip
    header = ["RLHF vs SFT"] + [title for _, _, title in columns]

    def row(label, cell):
        return [label] + [cell(m, role) for m, role, _ in columns]

    def wins(m, role):
        w = m["win_rate"].get(role)
        return f"{w['wins']} / {w['ties']} / {w['losses']}" if w else "—"

    def rate(m, role):
        w = m["win_rate"].get(role)
        return estimate(w["rate"], w["stderr"], 0.5) if w else "—"

    def lc(m, role):
        w = (m.get("length_controlled") or {}).get(role)
        return estimate(w["rate"], w["stderr"], 0.5) if w else "—"

    def gain(m, role):
        w = m["win_rate"].get(role)
        return estimate(w["score_delta"], w["score_delta_stderr"], 0.0, "+.3f") if w else "—"

    rows = [
        row("win rate of RLHF over SFT", rate),
        row("length-controlled win rate", lc),
        row("paired score gain RLHF - SFT", gain),
        row("wins / ties / losses", wins),
    ]
    return header, rows


def best_of_n_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): PPO's policy and best-of-n of SFT (one column each) against the SFT response, each with its
    KL from SFT (measured for PPO; log n - (n-1)/n for best-of-n)."""
    rl = metrics["policies"]["rlhf"]
    lc = metrics.get("length_controlled") or {}
    columns = [{
        "title": f"RLHF ({metrics.get('method', 'PPO')})", "kl": f"{fmt(rl['kl_from_sft'], '.2f')} ± {fmt(rl['kl_from_sft_stderr'], '.2f')}",
        "judge": metrics["win_rate"].get("judge"), "lc": lc.get("judge"), "rm": metrics["win_rate"]["reward_model"],
        "length": rl["length"], "eos": rl["eos_share"],
    }]  # fmt: skip
    for b in metrics.get("best_of_n") or []:
        columns.append({"title": f"best-of-{b['n']} of SFT", "kl": fmt(b["kl_from_sft"], ".2f"), "judge": b.get("judge"),
                        "lc": b.get("judge_length_controlled"), "rm": b.get("reward_model"), "length": b["length"], "eos": b["eos_share"]})  # fmt: skip

    def row(label, cell):
        return [label] + [cell(c) for c in columns]

    rows = [
        row("KL from SFT (nats; best-of-n: log n - (n-1)/n)", lambda c: c["kl"]),
        row("judge win rate over SFT", lambda c: estimate(c["judge"]["rate"], c["judge"]["stderr"], 0.5) if c["judge"] else "—"),
        row("judge win rate, length-controlled", lambda c: estimate(c["lc"]["rate"], c["lc"]["stderr"], 0.5) if c["lc"] else "—"),
        row("judge score gain over SFT",
            lambda c: estimate(c["judge"]["score_delta"], c["judge"]["score_delta_stderr"], 0.0, "+.3f") if c["judge"] else "—"),
        row("reward-model win rate over SFT", lambda c: estimate(c["rm"]["rate"], c["rm"]["stderr"], 0.5) if c["rm"] else "—"),
        row("response length (tokens, mean)", lambda c: fmt(c["length"], ".1f")),
        row("responses ending with EOS", lambda c: fmt(c["eos"], ".0%")),
    ]
    return ["held-out prompts"] + [c["title"] for c in columns], rows


def method_view(metrics: dict, name: str) -> dict:
    """eval.json as if `name` were its only RLHF policy (what policy_rows, judge_table and best_of_n_table read)."""
    return {**metrics, **metrics["methods"][name], "method": name}


def _accuracy_cell(metrics: dict, block: dict) -> str:
    own = block.get("policy_accuracy")  # DPO's implicit reward, on the reward model's held-out comparisons
    if own:
        return f"{fmt(own.get('accuracy'))} (implicit reward; {own.get('pairs', '?')} pairs)"
    rm = metrics.get("reward_model_accuracy")
    return f"{fmt(rm.get('accuracy'))} (reward model; {rm.get('pairs', '?')} pairs)" if rm else "—"


def methods_table(metrics: dict, costs: dict[str, dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one column per step-3 method, against the same SFT responses, under the judge (the reward model
    when there is none); `costs` = {method: {"seconds", "peak_memory_mb"}} (`pipeline.step_costs`)."""
    methods = metrics.get("methods") or {}
    role = "judge" if any(m["win_rate"].get("judge") for m in methods.values()) else "reward_model"
    by = "judge" if role == "judge" else "reward model"
    costs = costs or {}

    def win(m, key="win_rate", r=role):
        w = (m.get(key) or {}).get(r)
        return estimate(w["rate"], w["stderr"], 0.5) if w else "—"

    def gain(m):
        w = m["win_rate"].get(role)
        return estimate(w["score_delta"], w["score_delta_stderr"], 0.0, "+.3f") if w else "—"

    def kl(m):
        p = m["policies"]["rlhf"]
        return f"{fmt(p['kl_from_sft'], '.2f')} ± {fmt(p['kl_from_sft_stderr'], '.2f')}"

    def seconds(name):
        value = (costs.get(name) or {}).get("seconds")
        return "—" if not value else f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"

    def memory(name):
        value = (costs.get(name) or {}).get("peak_memory_mb")
        return f"{value / 1024:.1f} GB" if value else "—"

    rows = [
        [f"{by} win rate over SFT", *(win(m) for m in methods.values())],
        [f"{by} score gain over SFT (paired)", *(gain(m) for m in methods.values())],
        [f"{by} win rate, length-controlled", *(win(m, "length_controlled") for m in methods.values())],
    ]
    if any(m.get("other_prompts") for m in methods.values()):
        rows.append([f"{by} win rate, other-source prompts", *(win(m.get("other_prompts") or {}) for m in methods.values())])
    rows += [
        ["reward-model win rate over SFT", *(win(m, r="reward_model") for m in methods.values())],
        ["KL from SFT (nats / response)", *(kl(m) for m in methods.values())],
        ["response length (tokens, mean)", *(fmt(m["policies"]["rlhf"]["length"], ".1f") for m in methods.values())],
        ["responses ending with EOS", *(fmt(m["policies"]["rlhf"]["eos_share"], ".0%") for m in methods.values())],
        ["held-out pairwise accuracy", *(_accuracy_cell(metrics, m) for m in methods.values())],
        ["training time", *(seconds(name) for name in methods)],
        ["peak memory of the step (RSS; GPU: allocated)", *(memory(name) for name in methods)],
    ]
    return [f"{metrics.get('n_prompts')} held-out prompts", *methods], rows


def sampling_line(metrics: dict) -> str:
    gen = metrics.get("generation") or {}
    line = (f"Sampling (both policies and best-of-n): temperature {gen.get('temperature')}, top_p {gen.get('top_p')}, "
            f"top_k {gen.get('top_k')}, at most {gen.get('max_new_tokens')} new tokens, seed {gen.get('seed')} "
            f"(best-of-n candidates: seed {(gen.get('seed') or 0) + 1})")  # fmt: skip
    if gen.get("system_prompt"):
        line += f', system prompt "{gen["system_prompt"]}"'
    line += f"; {metrics.get('n_prompts')} held-out prompts ({metrics.get('prompts')})"
    other = metrics.get("other_prompts")
    if other:
        line += f", {other.get('n_prompts')} other-source prompts ({other.get('prompts')})"
    return line + "."


def accuracy_line(name: str, acc: dict | None) -> str | None:
    if not acc:
        return None
    return (
        f"{name} pairwise accuracy on {acc.get('comparisons', '?')} held-out comparisons ({acc.get('pairs', '?')} pairs): "
        f"{fmt(acc.get('accuracy'))} (longer-response baseline {fmt(acc.get('length_baseline_accuracy'))})"
    )


def agreement_lines(metrics: dict) -> list[str]:
    """How often the reward model and the judge agree (RLHF vs SFT per prompt; pairs of SFT candidates)."""
    lines = []
    for suffix, m in _sets(metrics):
        ag = m.get("agreement")
        if ag:
            lines.append(f"reward model and judge prefer the same of SFT / RLHF on {fmt(ag['rate'])} ± {fmt(ag['stderr'])} "
                         f"of {ag['prompts']} {'other-source' if suffix else 'held-out'} prompts (ties left out)")  # fmt: skip
    ca = metrics.get("candidate_agreement")
    if ca:
        lines.append(f"reward model and judge prefer the same of two SFT candidates on {fmt(ca['rate'])} of {ca['pairs']} pairs")
    return lines


def print_eval_table(metrics: dict, costs: dict[str, dict] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def show(title: str, header: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)

    if metrics.get("methods"):  # several methods: one row each (report.html has each method's tables)
        show(f"Step-3 methods against the same SFT responses on {metrics['n_prompts']} held-out prompts", *methods_table(metrics, costs))
    else:
        show(f"SFT vs RLHF on {metrics['n_prompts']} held-out prompts", *policy_rows(metrics))
        show("RLHF vs SFT under the reward model and under the judge", *judge_table(metrics))
    if metrics.get("best_of_n"):  # without best-of-n the PPO column repeats the judge table
        first = next(iter(metrics.get("methods") or {}), None)
        show(f"Best-of-n of SFT beside {first or 'PPO'}", *best_of_n_table(method_view(metrics, first) if first else metrics))
    for line in [sampling_line(metrics), SIGNIFICANCE_NOTE, *agreement_lines(metrics)]:
        console.print(line)
    for name, key in (("reward model", "reward_model_accuracy"), ("judge", "judge_accuracy")):
        line = accuracy_line(name, metrics.get(key))
        if line:
            console.print(line)


__all__ = ["accuracy_line", "agreement_lines", "best_of_n_table", "eval_rows", "judge_table", "method_view", "methods_table", "policy_rows",
           "print_eval_table", "sampling_line"]
