"""The `rlhfkit score` and `rlhfkit reward-eval` commands: any reward model (folder, run folder, hub id) on a file."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import load_comparisons
from .evaluation import evaluate_reward_model
from .folder import convert_legacy_reward_model, load_reward_model, reward_model_path
from .scoring import score, score_comparisons


def input_kind(spec: str) -> str:
    """'comparisons' or 'demonstrations', from the format prefix or the first record's keys."""
    from ..data import parse_spec, rows

    fmt, path = parse_spec(spec)
    if fmt != "jsonl":
        return "demonstrations" if fmt == "self-instruct" else "comparisons"
    for _, obj in rows(path):
        keys = set(obj) if isinstance(obj, dict) else set()
        return "comparisons" if keys & {"chosen", "rejected", "responses", "ranking", "score"} else "demonstrations"
    return "comparisons"


def run_score(reward_model: str, spec: str, output: str, batch_size: int = 16, normalise: bool = True) -> Path:
    """Score a file: comparisons get one line each with the scores of their responses (`rewards`, in
    response order); demonstration-like {prompt, response} records get one line each (`reward`)."""
    from ..data import comparison_to_json, demonstration_to_json, load_demonstrations, write_jsonl

    rm, tokenizer, _ = load_reward_model(reward_model)
    field = "rewards" if normalise else "raw_rewards"
    if input_kind(spec) == "comparisons":
        comparisons = load_comparisons(spec, score_range=None)
        scores = score_comparisons(rm, tokenizer, comparisons, batch_size, normalise=normalise)
        records = [{**comparison_to_json(c), field: s} for c, s in zip(comparisons, scores)]
    else:
        demos = load_demonstrations(spec)
        scores = score(rm, tokenizer, [d.messages for d in demos], [d.response for d in demos], batch_size, normalise)
        records = [{**demonstration_to_json(d), field[:-1]: s} for d, s in zip(demos, scores)]
    write_jsonl(output, records)
    return Path(output)


def run_reward_eval(reward_model: str, spec: str, output: str | None = None, batch_size: int = 16, max_comparisons: int = 0, bins: int = 10) -> dict:
    rm, tokenizer, stats = load_reward_model(reward_model)
    comparisons = load_comparisons(spec, score_range=None)
    if max_comparisons:
        comparisons = comparisons[:max_comparisons]
    metrics = {"reward_model": str(reward_model_path(reward_model)), "data": spec, **evaluate_reward_model(rm, tokenizer, comparisons, batch_size, bins)}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=1))
    return metrics


def run_reward_convert(old: str, new: str) -> Path:
    """`rlhfkit reward-convert`: an earlier rlhfkit reward-model folder rewritten in the standard form."""
    return convert_legacy_reward_model(old, new)
