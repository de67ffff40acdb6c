"""`rlhfkit evaluate`: the SFT and the RLHF policy side by side on held-out prompts.

Both policies answer the same prompts with the same sampling settings and seed. Reported per policy:

* **score**: mean normalised reward-model score of its responses (and under the judge, if given), read as PPO
  reads them: prompt + response tokens, a response cut at max_new_tokens without an added EOS (PPO's
  missing-EOS penalty is not applied: the EOS share is reported on its own);
* **win rate** of RLHF over SFT, prompt by prompt (a tie counts half), under the reward model and the judge,
  with its standard error over prompts; and the mean paired score difference;
* **KL from SFT**: mean over RLHF's own responses y of sum_t [log pi_RL(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)],
  in nats per response, with both distributions at the sampling temperature (as PPO's logged `kl`): a Monte
  Carlo estimate of KL(pi_RL || pi_SFT) per response (0 for SFT by definition);
* **length**: mean response tokens (the EOS included, as in PPO) and the **share ending with EOS**.

Plus the reward model's pairwise accuracy on held-out comparisons (`reward.evaluate_reward_model`), and the
judge's on the same comparisons when a judge is given.

Outputs in `output_dir`: `eval.json` (everything above; written last), `eval_samples.jsonl` (per prompt: the
prompt, both responses, their scores, lengths, EOS flags and KLs) and `config.yaml` (the settings).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from .config import EvaluateConfig, save_config
from .generate import Sample, generate_responses, load_for_inference, model_path_of, sampling_support
from .models import backbone_and_head
from .ppo_math import logprobs_from_logits
from .tokens import encode_prompt, pad

log = logging.getLogger("rlhfkit.evaluate")

POLICIES = ("sft", "rlhf")


# ----------------------------------------------------------------------------- log-probs


@torch.no_grad()
def response_logprobs(
    model,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    pad_token_id: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    support: torch.Tensor | None = None,
) -> list[float]:
    """sum_t log p(response_t | prompt, response_<t) for each (prompt, response), at `temperature`, over the
    `support` ids (those the sampler may draw, `generate.sampling_support`; None: the whole vocabulary).

    Prompts are left-padded and responses right-padded (as in generation), position ids follow the
    attention mask, and the LM head runs only on the positions that predict response tokens.
    """
    model.eval()
    device = next(model.parameters()).device
    backbone, head = backbone_and_head(model)
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        p = pad(list(prompts), pad_token_id, side="left").to(device)
        p_mask = pad([[1] * len(x) for x in prompts], 0, side="left").to(device)
        r = pad(list(responses), pad_token_id, side="right").to(device)
        r_mask = pad([[1] * len(x) for x in responses], 0, side="right").to(device)
        attention = torch.cat([p_mask, r_mask], dim=1)
        position_ids = (attention.cumsum(1) - 1).clamp(min=0)
        hidden = backbone(
            input_ids=torch.cat([p, r], dim=1), attention_mask=attention, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        logits = head(hidden[:, p.shape[1] - 1 : -1])  # position P-1+t predicts response token t
        logprobs = logprobs_from_logits(logits, r, temperature, support)  # with a support: -inf on the padding
        out.extend(torch.where(r_mask.bool(), logprobs, 0.0).sum(1).double().tolist())
    return out


# ----------------------------------------------------------------------------- statistics


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def win_rate(rlhf: Sequence[float], sft: Sequence[float]) -> dict:
    """Share of prompts where RLHF's response scores higher than SFT's (ties half), with its standard error."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rlhf, sft)]
    diffs = [a - b for a, b in zip(rlhf, sft)]
    return {
        "rate": _mean(outcomes),
        "stderr": _stderr(outcomes),
        "wins": sum(o == 1.0 for o in outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "losses": sum(o == 0.0 for o in outcomes),
        "score_delta": _mean(diffs),
        "score_delta_stderr": _stderr(diffs),
    }


def _summary(samples: list[Sample], scores: list[float], judge: list[float] | None, kl: list[float]) -> dict:
    return {
        "score": _mean(scores),
        "score_std": math.sqrt(_mean([(s - _mean(scores)) ** 2 for s in scores])) if scores else float("nan"),
        "judge_score": _mean(judge) if judge is not None else None,
        "kl_from_sft": _mean(kl),
        "kl_from_sft_stderr": _stderr(kl),
        "length": _mean([len(s.token_ids) for s in samples]),
        "eos_share": _mean([1.0 if s.has_eos else 0.0 for s in samples]),
    }


def reward_rows(rm, rm_tok, samples: list[Sample], prompt_ids: list[list[int]], conversations: list[list[dict]], same_vocab: bool) -> list[list[int]]:
    """What the reward model reads for each response, as in PPO's scoring: when it shares the policy's tokens
    (`reward.shares_tokens`), the policy's own prompt and response token ids (the EOS only if the response
    ended; a response cut at max_new_tokens is scored as cut); else the text re-encoded in the reward
    model's own layout and chat template (a cut response likewise stays cut), truncated like its training rows."""
    from .reward import encode_rows

    if same_vocab:
        return [p + s.token_ids for p, s in zip(prompt_ids, samples)]
    return encode_rows(rm, rm_tok, conversations, [s.text for s in samples], [s.has_eos for s in samples])


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation as the policies saw it (the reward model must read the same system prompt)."""
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _free() -> None:
    """Give back the memory of models the caller has just deleted."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the evaluation


def evaluate_policies(cfg: EvaluateConfig, progress: bool = True) -> tuple[dict, list[dict]]:
    """(metrics for eval.json, one record per prompt for eval_samples.jsonl)."""
    from .data import load_comparisons, load_prompts
    from .reward import evaluate_reward_model, load_reward_model, normalise_scores, reward_model_path, score_rows, shares_tokens

    t0 = time.time()
    gen = cfg.generation
    temperature = gen.temperature if gen.temperature > 0 else 1.0
    prompts = load_prompts(cfg.prompts)[: cfg.max_prompts]
    if not prompts:
        raise ValueError(f"{cfg.prompts}: no prompts")
    log.info("evaluating %s (SFT) and %s (RLHF) on %d prompts", cfg.sft_model, cfg.rlhf_model, len(prompts))

    # 1. Both policies answer every prompt (same settings, same seed).
    dtype_name = cfg.precision
    sft, tok = load_for_inference(cfg.sft_model, dtype_name)
    rlhf, rlhf_tok = load_for_inference(cfg.rlhf_model, dtype_name)
    if rlhf_tok.get_vocab() != tok.get_vocab():
        raise ValueError(f"{cfg.rlhf_model} and {cfg.sft_model} have different vocabularies: the KL between them is undefined")
    samples: dict[str, list[Sample]] = {}
    for name, model in (("sft", sft), ("rlhf", rlhf)):
        samples[name] = [g[0] for g in generate_responses(model, tok, prompts, gen, 1, progress)]

    # 2. KL from SFT on each policy's own samples: log pi(y) - log pi_SFT(y), summed over response tokens.
    prompt_ids = [encode_prompt(tok, m, gen.max_prompt_length, gen.system_prompt) for m in prompts]
    kl: dict[str, list[float]] = {}
    support = sampling_support(sft.get_output_embeddings().weight.shape[0], len(tok), tok.pad_token_id)  # the sampler's
    for name, model in (("sft", sft), ("rlhf", rlhf)):
        responses = [s.token_ids or [tok.eos_token_id] for s in samples[name]]
        own = response_logprobs(model, prompt_ids, responses, tok.pad_token_id, temperature, cfg.batch_size, support)
        ref = own if model is sft else response_logprobs(sft, prompt_ids, responses, tok.pad_token_id, temperature, cfg.batch_size, support)
        kl[name] = [a - b for a, b in zip(own, ref)]
    del sft, rlhf, model
    _free()

    # 3. Scores under the reward model (and the judge), normalised with each model's own statistics.
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    conversations = [_with_system(m, gen.system_prompt) for m in prompts]
    scored: dict[str, dict[str, list[float]]] = {"reward_model": {}, "judge": {}}
    accuracy: dict[str, dict | None] = {"reward_model": None, "judge": None}
    comparisons = None
    if cfg.comparisons is not None:
        comparisons = load_comparisons(cfg.comparisons, score_range=None)
        if cfg.max_comparisons:
            comparisons = comparisons[: cfg.max_comparisons]
    judges = [("reward_model", cfg.reward_model)] + ([("judge", cfg.judge_reward_model)] if cfg.judge_reward_model else [])
    for role, path in judges:
        rm, rm_tok, stats = load_reward_model(path, dtype)
        if torch.cuda.is_available():
            rm = rm.cuda()
        same_vocab = shares_tokens(rm, rm_tok, tok)
        for name in POLICIES:
            rows = reward_rows(rm, rm_tok, samples[name], prompt_ids, conversations, same_vocab)
            scored[role][name] = normalise_scores(score_rows(rm, rows, rm_tok.pad_token_id, cfg.batch_size), stats)
        if comparisons:
            accuracy[role] = {"data": cfg.comparisons, **evaluate_reward_model(rm, rm_tok, comparisons, cfg.batch_size)}
        del rm
        _free()

    judge = scored["judge"] or None
    metrics = {
        "sft_model": model_path_of(cfg.sft_model),
        "rlhf_model": model_path_of(cfg.rlhf_model),
        "reward_model": str(reward_model_path(cfg.reward_model)),
        "judge_reward_model": str(reward_model_path(cfg.judge_reward_model)) if cfg.judge_reward_model else None,
        "prompts": cfg.prompts,
        "n_prompts": len(prompts),
        "generation": gen.model_dump(),
        "kl_temperature": temperature,
        "policies": {
            name: _summary(samples[name], scored["reward_model"][name], judge[name] if judge else None, kl[name])
            for name in POLICIES
        },
        "win_rate": {
            "reward_model": win_rate(scored["reward_model"]["rlhf"], scored["reward_model"]["sft"]),
            "judge": win_rate(judge["rlhf"], judge["sft"]) if judge else None,
        },
        "reward_model_accuracy": accuracy["reward_model"],
        "judge_accuracy": accuracy["judge"],
        "seconds": time.time() - t0,
    }
    records = []
    for i, messages in enumerate(prompts):
        record = {"index": i, "prompt": messages[-1]["content"], "messages": messages}
        for name in POLICIES:
            s = samples[name][i]
            record[name] = {
                "response": s.text,
                "score": scored["reward_model"][name][i],
                "judge_score": judge[name][i] if judge else None,
                "length": len(s.token_ids),
                "has_eos": s.has_eos,
                "kl_from_sft": kl[name][i],
            }
        records.append(record)
    return metrics, records


def _json_safe(obj):
    """NaN / inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run_evaluate(cfg: EvaluateConfig, print_table: bool = True) -> Path:
    """Evaluate, write eval.json and eval_samples.jsonl, print the table; returns the eval.json path."""
    metrics, records = evaluate_policies(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    with (out / "eval_samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(_json_safe(r), ensure_ascii=False) + "\n")
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(_json_safe(metrics), indent=1))
    tmp.replace(out / "eval.json")  # written last: its presence means the evaluation is complete
    if print_table:
        print_eval_table(metrics)
    return out / "eval.json"


# ----------------------------------------------------------------------------- the table


def _fmt(x, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def eval_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, SFT, RLHF) rows of the evaluation table (shared by the terminal table and the report)."""
    sft, rl = metrics["policies"]["sft"], metrics["policies"]["rlhf"]
    rows = [("reward-model score (normalised, mean)", _fmt(sft["score"]), _fmt(rl["score"]))]
    wr = metrics["win_rate"]["reward_model"]
    rows.append(("win rate over the other, reward model", _fmt(1 - wr["rate"]), f"{_fmt(wr['rate'])} ± {_fmt(wr['stderr'])}"))
    if metrics["win_rate"].get("judge"):
        wj = metrics["win_rate"]["judge"]
        rows.append(("judge score (normalised, mean)", _fmt(sft["judge_score"]), _fmt(rl["judge_score"])))
        rows.append(("win rate over the other, judge", _fmt(1 - wj["rate"]), f"{_fmt(wj['rate'])} ± {_fmt(wj['stderr'])}"))
    rows.append(("KL from SFT (nats / response)", _fmt(sft["kl_from_sft"]), f"{_fmt(rl['kl_from_sft'])} ± {_fmt(rl['kl_from_sft_stderr'])}"))
    rows.append(("response length (tokens, mean)", _fmt(sft["length"], ".1f"), _fmt(rl["length"], ".1f")))
    rows.append(("responses ending with EOS", _fmt(sft["eos_share"], ".0%"), _fmt(rl["eos_share"], ".0%")))
    return rows


def accuracy_line(name: str, acc: dict | None) -> str | None:
    if not acc:
        return None
    return (
        f"{name} pairwise accuracy on {acc.get('comparisons', '?')} held-out comparisons ({acc.get('pairs', '?')} pairs): "
        f"{_fmt(acc.get('accuracy'))} (longer-response baseline {_fmt(acc.get('length_baseline_accuracy'))})"
    )


def print_eval_table(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"SFT vs RLHF on {metrics['n_prompts']} held-out prompts")
    table.add_column("metric")
    table.add_column("SFT", justify="right")
    table.add_column("RLHF", justify="right", style="bold")
    for row in eval_rows(metrics):
        table.add_row(*row)
    console.print(table)
    wr = metrics["win_rate"]["reward_model"]
    console.print(
        f"RLHF - SFT reward-model score: {_fmt(wr['score_delta'], '+.3f')} ± {_fmt(wr['score_delta_stderr'])} "
        f"(paired over prompts; {wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses)"
    )
    for name, key in (("reward model", "reward_model_accuracy"), ("judge", "judge_accuracy")):
        line = accuracy_line(name, metrics.get(key))
        if line:
            console.print(line)


__all__ = ["evaluate_policies", "print_eval_table", "response_logprobs", "run_evaluate", "win_rate"]
