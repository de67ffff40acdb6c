"""`rlhfkit evaluate`: the SFT and the RLHF policy side by side on held-out prompts, under the reward model PPO
optimised and under a judge reward model PPO never saw.

Both policies answer the same prompts with the same sampling settings and seed, on the held-out prompts and, if
given, on a second prompt set from another source (`other_prompts`, its own column). Reported per prompt set:

* **score**: mean normalised reward-model score of each policy's responses (and the judge's), read as PPO
  reads them: prompt + response tokens, a response cut at max_new_tokens without an added EOS (PPO's
  missing-EOS penalty is not applied: the EOS share is reported on its own);
* **win rate** of RLHF over SFT, prompt by prompt (a tie counts half), under the reward model and the judge,
  with its standard error over prompts, the win/tie/loss counts and the paired score gain with its standard
  error; and the **length-controlled win rate**, the length difference regressed out (`stats.py`);
* **KL from SFT**: mean over RLHF's own responses y of sum_t [log pi_RL(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)],
  in nats per response, with both distributions at the sampling temperature (as PPO's logged `kl`): a Monte
  Carlo estimate of KL(pi_RL || pi_SFT) per response (0 for SFT by definition);
* **length**: mean response tokens (the EOS included, as in PPO) and the **share ending with EOS**;
* how often the reward model and the judge **agree** on which of SFT / RLHF is better.

On the held-out prompts also **best-of-n** of SFT for each n of `best_of_n`: max(n) more SFT responses per prompt
(another seed), the reward model's favourite of the first n kept and compared with the SFT response like RLHF's,
at a KL from SFT of log n - (n-1)/n. It shows what the reward model's preference is worth without RL.

Plus the reward model's pairwise accuracy on held-out comparisons (`reward.evaluate_reward_model`), and the
judge's on the same comparisons when a judge is given. The judge is loaded and scores exactly like the reward
model (`reward.load_reward_model`, `reward.score_rows`): any reward-model folder can be one.

Outputs in `output_dir`: `eval.json` (everything above; written last), `eval_samples.jsonl` (per held-out prompt:
the prompt, both responses, their scores, lengths, EOS flags and KLs, and the best-of-n candidates with their
scores and which one each n kept), `eval_samples_other.jsonl` (the same for the other-source prompts) and
`config.yaml` (the settings). The tables are `eval_tables.py`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import EvaluateConfig, save_config
from .eval_tables import print_eval_table
from .generate import Sample, generate_responses, load_for_inference, model_path_of, sampling_support
from .models import backbone_and_head
from .rl.logprobs import logprobs_from_logits
from .stats import (
    agreement,
    best_of_n_choice,
    best_of_n_kl,
    length_controlled_win_rate,
    mean,
    stderr,
    win_rate,
)
from .tokens import encode_prompt, pad

log = logging.getLogger("rlhfkit.evaluate")

POLICIES = ("sft", "rlhf")  # with `methods`: "sft" and the method names
SAMPLE_FILES = {"heldout": "eval_samples.jsonl", "other": "eval_samples_other.jsonl"}


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


def _summary(samples: list[Sample], scores: list[float], judge: list[float] | None, kl: list[float]) -> dict:
    return {
        "score": mean(scores),
        "score_std": math.sqrt(mean([(s - mean(scores)) ** 2 for s in scores])) if scores else float("nan"),
        "judge_score": mean(judge) if judge is not None else None,
        "kl_from_sft": mean(kl),
        "kl_from_sft_stderr": stderr(kl),
        "length": mean([len(s.token_ids) for s in samples]),
        "eos_share": mean([1.0 if s.has_eos else 0.0 for s in samples]),
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


def _load_prompt_set(spec, max_prompts: int) -> list[list[dict]]:
    from .data import load_prompts

    prompts = load_prompts(spec)[:max_prompts]
    if not prompts:
        raise ValueError(f"{spec}: no prompts")
    if len(prompts) < 128:
        log.warning("%s: %d prompts; one standard error of a win rate can reach %.3f (128 prompts keep it under 0.045)",
                    spec, len(prompts), 0.5 / math.sqrt(len(prompts)))  # fmt: skip
    return prompts


@dataclass
class PromptSet:
    """One prompt set and everything measured on it: the policies' responses and KLs, and every score."""

    spec: object
    prompts: list[list[dict]]
    prompt_ids: list[list[int]] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # policy -> one response per prompt
    kl: dict[str, list[float]] = field(default_factory=dict)  # policy -> per prompt
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # role -> policy -> per prompt
    candidates: list[list[Sample]] | None = None  # best-of-n: max(n) SFT responses per prompt
    candidate_scores: dict[str, list[list[float]]] = field(default_factory=dict)  # role -> per prompt, per candidate


def _sample_policy(ps: PromptSet, name: str, model, sft, tok, cfg: EvaluateConfig, temperature: float, progress: bool) -> None:
    """One policy answers every prompt of the set (every policy with the same settings and seed), and each response's
    KL from SFT: log pi(y) - log pi_SFT(y), summed over response tokens."""
    gen = cfg.generation
    ps.samples[name] = [g[0] for g in generate_responses(model, tok, ps.prompts, gen, 1, progress)]
    ps.prompt_ids = [encode_prompt(tok, m, gen.max_prompt_length, gen.system_prompt) for m in ps.prompts]
    if model is sft:  # log pi_SFT(y) - log pi_SFT(y): no forward pass needed
        ps.kl[name] = [0.0] * len(ps.samples[name])
        return
    support = sampling_support(sft.get_output_embeddings().weight.shape[0], len(tok), tok.pad_token_id)  # the sampler's
    responses = [s.token_ids or [tok.eos_token_id] for s in ps.samples[name]]
    own = response_logprobs(model, ps.prompt_ids, responses, tok.pad_token_id, temperature, cfg.batch_size, support)
    ref = response_logprobs(sft, ps.prompt_ids, responses, tok.pad_token_id, temperature, cfg.batch_size, support)
    ps.kl[name] = [a - b for a, b in zip(own, ref)]


def compared_policies(cfg: EvaluateConfig) -> dict[str, str]:
    """name -> model of the policies compared with SFT: the methods, or rlhf_model as 'rlhf'."""
    return dict(cfg.methods) if cfg.methods else {"rlhf": cfg.rlhf_model}


def _sample_candidates(ps: PromptSet, sft, tok, cfg: EvaluateConfig, progress: bool) -> None:
    """max(best_of_n) more SFT responses per prompt, with another seed than the SFT response they are compared
    with, and as many sequences per generate call as a normal batch (batch_size // n prompts)."""
    n = max(cfg.best_of_n)
    gen = cfg.generation.model_copy(update={"seed": cfg.generation.seed + 1, "batch_size": max(1, cfg.generation.batch_size // n)})
    ps.candidates = generate_responses(sft, tok, ps.prompts, gen, n, progress)


def _score_set(ps: PromptSet, role: str, rm, rm_tok, stats: dict, tok, cfg: EvaluateConfig) -> None:
    """Normalised scores of every response of the set (and of its best-of-n candidates) under one reward model."""
    from .reward import normalise_scores, score_rows, shares_tokens

    same_vocab = shares_tokens(rm, rm_tok, tok)
    conversations = [_with_system(m, cfg.generation.system_prompt) for m in ps.prompts]
    ps.scores[role] = {}
    for name in ps.samples:
        rows = reward_rows(rm, rm_tok, ps.samples[name], ps.prompt_ids, conversations, same_vocab)
        ps.scores[role][name] = normalise_scores(score_rows(rm, rows, rm_tok.pad_token_id, cfg.batch_size), stats)
    if ps.candidates:
        k = len(ps.candidates[0])
        flat = [s for group in ps.candidates for s in group]
        rows = reward_rows(
            rm, rm_tok, flat, [p for p in ps.prompt_ids for _ in range(k)], [c for c in conversations for _ in range(k)], same_vocab
        )
        scores = normalise_scores(score_rows(rm, rows, rm_tok.pad_token_id, cfg.batch_size), stats)
        ps.candidate_scores[role] = [scores[i : i + k] for i in range(0, len(scores), k)]


def set_metrics(ps: PromptSet, policy: str = "rlhf") -> dict:
    """`policy` (as "rlhf") vs SFT on one prompt set, under the reward model and (if scored) the judge."""
    roles = [r for r in ("reward_model", "judge") if r in ps.scores]
    judge = ps.scores.get("judge")
    scores = {r: {"sft": ps.scores[r]["sft"], "rlhf": ps.scores[r][policy]} for r in roles}
    lengths = {"sft": [len(s.token_ids) for s in ps.samples["sft"]], "rlhf": [len(s.token_ids) for s in ps.samples[policy]]}
    out = {
        "prompts": ps.spec,
        "n_prompts": len(ps.prompts),
        "policies": {
            key: _summary(ps.samples[name], ps.scores["reward_model"][name], judge[name] if judge else None, ps.kl[name])
            for key, name in (("sft", "sft"), ("rlhf", policy))
        },
        "win_rate": {r: None for r in ("reward_model", "judge")},
        "length_controlled": {r: None for r in ("reward_model", "judge")},
        "agreement": None,
    }
    for r in roles:
        rl, sf = scores[r]["rlhf"], scores[r]["sft"]
        out["win_rate"][r] = win_rate(rl, sf)
        out["length_controlled"][r] = length_controlled_win_rate(rl, sf, lengths["rlhf"], lengths["sft"])
    if judge:
        diffs = {r: [a - b for a, b in zip(scores[r]["rlhf"], scores[r]["sft"])] for r in roles}
        out["agreement"] = agreement(diffs["reward_model"], diffs["judge"])
    return out


def best_of_n_metrics(ps: PromptSet, ns: Sequence[int]) -> list[dict]:
    """Per n: the reward model's favourite of the first n SFT candidates against the SFT response, under the reward
    model and the judge, with its KL from SFT, log n - (n-1)/n."""
    if not ps.candidates:
        return []
    sft_length = [len(s.token_ids) for s in ps.samples["sft"]]
    rows = []
    for n in sorted(set(ns)):
        chosen = best_of_n_choice(ps.candidate_scores["reward_model"], n)
        kept = [group[j] for group, j in zip(ps.candidates, chosen)]
        length = [len(s.token_ids) for s in kept]
        row = {"n": n, "kl_from_sft": best_of_n_kl(n), "chosen": chosen, "length": mean(length),
               "eos_share": mean([1.0 if s.has_eos else 0.0 for s in kept])}  # fmt: skip
        for role in ("reward_model", "judge"):
            if role not in ps.candidate_scores:
                row[role] = row[f"{role}_length_controlled"] = row[f"{role}_score"] = None
                continue
            score = [scores[j] for scores, j in zip(ps.candidate_scores[role], chosen)]
            row[f"{role}_score"] = mean(score)
            row[role] = win_rate(score, ps.scores[role]["sft"])
            row[f"{role}_length_controlled"] = length_controlled_win_rate(score, ps.scores[role]["sft"], length, sft_length)
        rows.append(row)
    return rows


def candidate_agreement(ps: PromptSet) -> dict | None:
    """How often the reward model and the judge prefer the same of two SFT candidates for a prompt, over all pairs
    of candidates (pairs of a prompt are not independent: no standard error)."""
    if not ps.candidates or "judge" not in ps.candidate_scores:
        return None
    rm, judge = [], []
    for a, b in zip(ps.candidate_scores["reward_model"], ps.candidate_scores["judge"]):
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                rm.append(a[i] - a[j])
                judge.append(b[i] - b[j])
    out = agreement(rm, judge)
    return {"rate": out["rate"], "pairs": out["prompts"]}


def evaluate_policies(cfg: EvaluateConfig, progress: bool = True) -> tuple[dict, dict[str, list[dict]]]:
    """(metrics for eval.json, {"heldout": one record per held-out prompt, "other": the same for other_prompts})."""
    from .data import load_comparisons
    from .reward import evaluate_reward_model, load_reward_model, reward_model_path

    t0 = time.time()
    gen = cfg.generation
    temperature = gen.temperature if gen.temperature > 0 else 1.0
    sets = {"heldout": PromptSet(cfg.prompts, _load_prompt_set(cfg.prompts, cfg.max_prompts))}
    if cfg.other_prompts is not None:
        sets["other"] = PromptSet(cfg.other_prompts, _load_prompt_set(cfg.other_prompts, cfg.max_prompts))
    policies = compared_policies(cfg)
    log.info("evaluating %s (SFT) and %s on %s", cfg.sft_model, ", ".join(f"{path} ({name})" for name, path in policies.items()),
             " and ".join(f"{len(ps.prompts)} prompts ({ps.spec})" for ps in sets.values()))  # fmt: skip

    # 1. Every policy answers every prompt (same settings, same seed); KL from SFT; best-of-n candidates from SFT.
    dtype_name = cfg.precision
    sft, tok = load_for_inference(cfg.sft_model, dtype_name)
    for ps in sets.values():
        _sample_policy(ps, "sft", sft, sft, tok, cfg, temperature, progress)
    if cfg.best_of_n:
        _sample_candidates(sets["heldout"], sft, tok, cfg, progress)
    for name, path in policies.items():  # one at a time in memory, beside SFT
        rlhf, rlhf_tok = load_for_inference(path, dtype_name)
        if rlhf_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"{path} and {cfg.sft_model} have different vocabularies: the KL between them is undefined")
        for ps in sets.values():
            _sample_policy(ps, name, rlhf, sft, tok, cfg, temperature, progress)
        del rlhf
        _free()
    del sft
    _free()

    # 2. Scores under the reward model (and the judge), normalised with each model's own statistics.
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    accuracy: dict[str, dict | None] = {"reward_model": None, "judge": None}
    comparisons = None
    if cfg.comparisons is not None:
        comparisons = load_comparisons(cfg.comparisons, score_range=None)
        if cfg.max_comparisons:
            comparisons = comparisons[: cfg.max_comparisons]
    judges = [("reward_model", cfg.reward_model)] + ([("judge", cfg.judge_reward_model)] if cfg.judge_reward_model else [])
    for role, path in judges:
        rm, rm_tok, rm_stats = load_reward_model(path, dtype)
        if torch.cuda.is_available():
            rm = rm.cuda()
        for ps in sets.values():
            _score_set(ps, role, rm, rm_tok, rm_stats, tok, cfg)
        if comparisons:
            accuracy[role] = {"data": cfg.comparisons, **evaluate_reward_model(rm, rm_tok, comparisons, cfg.batch_size)}
        del rm
        _free()

    heldout = sets["heldout"]
    best_of_n = best_of_n_metrics(heldout, cfg.best_of_n)
    first = next(iter(policies))
    metrics = {
        "sft_model": model_path_of(cfg.sft_model),
        "rlhf_model": model_path_of(policies[first]),
        "reward_model": str(reward_model_path(cfg.reward_model)),
        "judge_reward_model": str(reward_model_path(cfg.judge_reward_model)) if cfg.judge_reward_model else None,
        **set_metrics(heldout, first),
        "generation": gen.model_dump(),
        "kl_temperature": temperature,
        "best_of_n": best_of_n,
        "candidate_agreement": candidate_agreement(heldout),
        "other_prompts": set_metrics(sets["other"], first) if "other" in sets else None,
        "reward_model_accuracy": accuracy["reward_model"],
        "judge_accuracy": accuracy["judge"],
        "seconds": time.time() - t0,
    }
    if cfg.methods:  # the same block for each method, and the method's own held-out pairwise accuracy if it has one (DPO)
        metrics["methods"] = {
            name: {"model": model_path_of(path), **set_metrics(heldout, name),
                   "other_prompts": set_metrics(sets["other"], name) if "other" in sets else None,
                   "policy_accuracy": policy_accuracy(path)}
            for name, path in policies.items()
        }  # fmt: skip
    records = {name: _records(ps, best_of_n if name == "heldout" else []) for name, ps in sets.items()}
    for row in best_of_n:
        row.pop("chosen")  # per prompt: in the records
    return metrics, records


def _records(ps: PromptSet, best_of_n: list[dict]) -> list[dict]:
    """One record per prompt: both responses with their scores, lengths, EOS flags and KLs (and the best-of-n
    candidates with their scores and which one each n kept)."""
    judged = "judge" in ps.scores
    records = []
    for i, messages in enumerate(ps.prompts):
        record = {"index": i, "prompt": messages[-1]["content"], "messages": messages}
        for name in ps.samples:
            s = ps.samples[name][i]
            record[name] = {
                "response": s.text,
                "score": ps.scores["reward_model"][name][i],
                "judge_score": ps.scores["judge"][name][i] if judged else None,
                "length": len(s.token_ids),
                "has_eos": s.has_eos,
                "kl_from_sft": ps.kl[name][i],
            }
        if ps.candidates:
            record["best_of_n"] = {
                "chosen": {str(row["n"]): row["chosen"][i] for row in best_of_n},
                "candidates": [
                    {"response": s.text, "score": ps.candidate_scores["reward_model"][i][j],
                     "judge_score": ps.candidate_scores["judge"][i][j] if judged else None,
                     "length": len(s.token_ids), "has_eos": s.has_eos}
                    for j, s in enumerate(ps.candidates[i])
                ],
            }  # fmt: skip
        records.append(record)
    return records


def policy_accuracy(path: str) -> dict | None:
    """The held-out pairwise accuracy a policy's run measured itself (DPO's implicit reward, `heldout_accuracy.json`
    in its run folder), or None."""
    from .rl.dpo import ACCURACY_FILE

    folder = Path(path)
    for candidate in (folder / ACCURACY_FILE, folder.parent / ACCURACY_FILE):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return None


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
    """Evaluate, write eval.json and the samples, print the tables; returns the eval.json path."""
    metrics, records = evaluate_policies(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    for name, rows in records.items():
        with (out / SAMPLE_FILES[name]).open("w") as f:
            for r in rows:
                f.write(json.dumps(_json_safe(r), ensure_ascii=False) + "\n")
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(_json_safe(metrics), indent=1))
    tmp.replace(out / "eval.json")  # written last: its presence means the evaluation is complete
    if print_table:
        print_eval_table(metrics)
    return out / "eval.json"


__all__ = ["PromptSet", "evaluate_policies", "print_eval_table", "response_logprobs", "run_evaluate", "win_rate"]
