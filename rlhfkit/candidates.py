"""`rlhfkit candidates`: K responses per prompt from one or several models, as a labelling task file.

The output is the JSONL that `rlhfkit label serve --tasks` reads (`rlhfkit.labelling.tasks`)::

    {"id": "p-3f2a...", "messages": [...],
     "responses": [{"text": "...", "model": "runs/sft", "sampling": {...}}, ...]}

- K is split across the models round-robin: response slot j comes from model j % len(models), so
  k=4 with 2 models gives 2 each and k=5 with 2 models gives 3 + 2. The responses of a task stay in
  slot order (A, B, A, B, ...); the labelling page shuffles them per annotator anyway.
- Each model is loaded once; all its prompts are sampled in batches of `generation.batch_size`.
  Model i (0-based, in the order given) samples with seed `generation.seed + i`, so the same model
  given twice does not repeat itself; `sampling` beside each response is the settings it was sampled
  with (seed included) and `model` the name as given.
- Duplicates: a response identical (after stripping whitespace) to one already kept for the same
  prompt, from any model, or an empty response, is re-sampled once from the same model, right away
  (seed `generation.seed + 1000 + i`); if the new sample is still a duplicate or empty it is dropped.
  Re-sampled and dropped responses are counted in the log. A prompt left with fewer than 2 responses
  has nothing to rank and is dropped from the output (counted in the log too).
  Empty responses are never kept because the comparison reader of the reward step refuses them.
- Task ids are stable: "p-" + the first 16 hex digits of the SHA-256 of the prompt conversation
  (`messages` as canonical JSON), so re-running on the same prompts gives the same ids and
  `label serve` imports the file idempotently. Repeated prompts are dropped (counted in the log).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import CandidatesConfig, ConfigError, GenerationSettings
from .data import load_prompts

log = logging.getLogger("rlhfkit.candidates")

RESAMPLE_SEED_OFFSET = 1000


def task_id(messages: list[dict]) -> str:
    """Stable id of a prompt: a hash of its conversation."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "p-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def split_k(k: int, n_models: int) -> list[int]:
    """Responses per model when slot j goes to model j % n_models (k=4, 2 models -> [2, 2])."""
    return [k // n_models + (i < k % n_models) for i in range(n_models)]


@dataclass
class _Slot:
    text: str
    model: str
    sampling: dict


@dataclass
class CandidateStats:
    prompts: int = 0
    repeated_prompts: int = 0
    sampled: Counter = field(default_factory=Counter)  # model -> responses sampled (first round)
    kept: Counter = field(default_factory=Counter)  # model -> responses written
    duplicates: int = 0  # first-round responses identical to one already kept for the prompt
    empty: int = 0  # first-round responses that were empty
    resampled: int = 0  # duplicates + empty, each re-sampled once
    dropped: int = 0  # re-samples that were again duplicate or empty
    dropped_tasks: int = 0  # prompts left with fewer than 2 responses
    tasks: int = 0


def _unique_prompts(prompts: list[list[dict]], stats: CandidateStats) -> list[list[dict]]:
    seen, out = set(), []
    for messages in prompts:
        tid = task_id(messages)
        if tid not in seen:
            seen.add(tid)
            out.append(messages)
    stats.repeated_prompts = len(prompts) - len(out)
    if stats.repeated_prompts:
        log.warning("dropped %d repeated prompts (same conversation, same task id)", stats.repeated_prompts)
    return out


def _key(text: str) -> str:
    return text.strip()


def _generate(model, tokenizer, prompts, gen: GenerationSettings, n: int, progress: bool):
    """`generate_responses`, also for greedy decoding with n > 1 (transformers refuses
    num_return_sequences > 1 without sampling): the one greedy response, n times."""
    from .generate import generate_responses

    if gen.temperature == 0 and n > 1:
        return [group * n for group in generate_responses(model, tokenizer, prompts, gen, 1, progress=progress)]
    return generate_responses(model, tokenizer, prompts, gen, n, progress=progress)


def sample_model(
    name: str,
    index: int,
    count: int,
    prompts: list[list[dict]],
    kept: list[list[_Slot]],
    gen: GenerationSettings,
    precision: str,
    stats: CandidateStats,
    progress: bool = True,
) -> None:
    """Load `name` once, sample `count` responses per prompt, re-sample duplicates/empties once; append to `kept`."""
    from .generate import load_for_inference

    log.info("model %d (%s): %d responses for each of %d prompts", index, name, count, len(prompts))
    model, tokenizer = load_for_inference(name, precision)
    try:
        first = gen.model_copy(update={"seed": gen.seed + index})
        samples = _generate(model, tokenizer, prompts, first, count, progress)
        stats.sampled[name] += sum(len(s) for s in samples)
        first_sampling = first.model_dump()

        # Keep what is new; remember how many each prompt still needs.
        missing: dict[int, int] = {}
        for p, group in enumerate(samples):
            seen = {_key(s.text) for s in kept[p]}
            for s in group:
                if not _key(s.text):
                    stats.empty += 1
                elif _key(s.text) in seen:
                    stats.duplicates += 1
                else:
                    seen.add(_key(s.text))
                    kept[p].append(_Slot(s.text, name, first_sampling))
                    continue
                missing[p] = missing.get(p, 0) + 1
        if not missing:
            return

        # One re-sampling round for the prompts that lost responses; what is still bad is dropped.
        stats.resampled += sum(missing.values())
        again = gen.model_copy(update={"seed": gen.seed + RESAMPLE_SEED_OFFSET + index})
        again_sampling = again.model_dump()
        redo = sorted(missing)
        more = _generate(model, tokenizer, [prompts[p] for p in redo], again, max(missing.values()), progress)
        for p, group in zip(redo, more):
            seen = {_key(s.text) for s in kept[p]}
            for s in group[: missing[p]]:
                if _key(s.text) and _key(s.text) not in seen:
                    seen.add(_key(s.text))
                    kept[p].append(_Slot(s.text, name, again_sampling))
                else:
                    stats.dropped += 1
    finally:
        import torch

        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _interleave(slots: list[_Slot], models: list[str]) -> list[_Slot]:
    """Round-robin order over models (A, B, A, B, ...), each model's responses in sampling order."""
    by_model = {m: [s for s in slots if s.model == m] for m in dict.fromkeys(models)}
    out: list[_Slot] = []
    while any(by_model.values()):
        for m in by_model:
            if by_model[m]:
                out.append(by_model[m].pop(0))
    return out


def make_candidates(cfg: CandidatesConfig, progress: bool = True) -> tuple[list[dict], CandidateStats]:
    """The task records (not written) and what happened."""
    models = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    if not models:
        raise ConfigError("field 'models': give at least one model (--model NAME)")
    if cfg.k < len(models):
        raise ConfigError(f"field 'k': k={cfg.k} is smaller than the {len(models)} models; each model needs at least one response")
    stats = CandidateStats()
    prompts = load_prompts(cfg.prompts)  # DataError: file:line: field
    prompts = _unique_prompts(prompts, stats)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    stats.prompts = len(prompts)

    kept: list[list[_Slot]] = [[] for _ in prompts]
    counts = split_k(cfg.k, len(models))
    log.info("%d prompts, k=%d over %d model(s): %s", len(prompts), cfg.k, len(models), ", ".join(f"{m}: {c}" for m, c in zip(models, counts)))
    for index, (name, count) in enumerate(zip(models, counts)):
        sample_model(name, index, count, prompts, kept, cfg.generation, cfg.precision, stats, progress)

    records = []
    for messages, slots in zip(prompts, kept):
        if len(slots) < 2:
            stats.dropped_tasks += 1
            continue
        ordered = _interleave(slots, models)
        for s in ordered:
            stats.kept[s.model] += 1
        records.append(
            {
                "id": task_id(messages),
                "messages": messages,
                "responses": [{"text": s.text, "model": s.model, "sampling": s.sampling} for s in ordered],
            }
        )
    stats.tasks = len(records)
    log.info(
        "%d duplicate and %d empty responses re-sampled once; %d of those still duplicate or empty, dropped; "
        "%d prompts dropped with fewer than 2 responses",
        stats.duplicates, stats.empty, stats.dropped, stats.dropped_tasks,
    )  # fmt: skip
    return records, stats


def run_candidates(cfg: CandidatesConfig, progress: bool = True) -> Path:
    records, stats = make_candidates(cfg, progress)
    if not records:
        raise ValueError(f"{cfg.prompts}: no task has 2 distinct non-empty responses; nothing written")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out)
    log.info(
        "wrote %d tasks (%d responses: %s) to %s",
        stats.tasks, sum(stats.kept.values()), ", ".join(f"{m}: {n}" for m, n in stats.kept.items()), out,
    )  # fmt: skip
    return out
