"""What the steps call: `load_demonstrations`, `load_comparisons`, `load_prompts` on a spec (a source,
"FORMAT:SOURCE", or a list of them), and the train/eval split by prompt."""

import hashlib
import json
import re

from .containers import log
from .formats import DEFAULT_SCORE_RANGE, read_comparisons, read_demonstrations, read_prompts
from .hh_rlhf import read_hh_rlhf, read_hh_rlhf_demonstrations
from .oasst import read_oasst_comparisons, read_oasst_demonstrations, read_oasst_prompts
from .records import Comparison, Demonstration, ReadStats
from .self_instruct import read_self_instruct

FORMATS = ("jsonl", "hh-rlhf", "oasst", "self-instruct")


# ---------------------------------------------------------------------------------------
# Specs: what configs name. "FORMAT:PATH" or just "PATH" (= "jsonl:PATH"), or a list of them.


def parse_spec(spec) -> tuple[str, str]:
    """'hh-rlhf:data/helpful-base.jsonl.gz' -> ('hh-rlhf', 'data/helpful-base.jsonl.gz')."""
    text = str(spec)
    match = re.fullmatch(r"([a-z][a-z0-9-]+):(.+)", text, flags=re.DOTALL)
    if match is None:
        return "jsonl", text
    fmt, path = match.groups()
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} in {text!r} (expected one of {', '.join(FORMATS)})")
    return fmt, path


def _load(spec, readers: dict, kind: str, **kwargs) -> list:
    if isinstance(spec, (list, tuple)):
        return [record for one in spec for record in _load(one, readers, kind, **kwargs)]
    fmt, path = parse_spec(spec)
    if fmt not in readers:
        raise ValueError(f"{spec!r}: the {fmt} format has no {kind} (use one of {', '.join(readers)})")
    return readers[fmt](path, **kwargs)


def _unique(prompts: list[list[dict]], stats: ReadStats | None) -> list[list[dict]]:
    """Drop repeated prompts (counted as "duplicate_prompt")."""
    seen, unique = set(), []
    for messages in prompts:
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            unique.append(messages)
    repeats = len(prompts) - len(unique)
    if repeats:
        log.warning("dropped %d repeated prompts (duplicate_prompt=%d)", repeats, repeats)
    if stats is not None:
        stats.records -= repeats
        stats.skipped["duplicate_prompt"] += repeats
    return unique


def load_demonstrations(spec, *, stats: ReadStats | None = None) -> list[Demonstration]:
    return _load(
        spec,
        {
            "jsonl": read_demonstrations,
            "hh-rlhf": read_hh_rlhf_demonstrations,
            "oasst": read_oasst_demonstrations,
            "self-instruct": read_self_instruct,
        },
        "demonstrations",
        stats=stats,
    )


def load_comparisons(
    spec, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> list[Comparison]:
    def jsonl(path, stats):
        return read_comparisons(path, score_range=score_range, stats=stats)

    readers = {"jsonl": jsonl, "hh-rlhf": read_hh_rlhf, "oasst": read_oasst_comparisons}
    return _load(spec, readers, "comparisons", stats=stats)


def load_prompts(spec, *, stats: ReadStats | None = None) -> list[list[dict]]:
    """Prompts from a prompts file, or the prompts of an HH-RLHF, OASST (tree roots) or
    Self-Instruct file (repeats dropped for those, counted as "duplicate_prompt")."""

    def prompts_of(reader):
        return lambda path, stats: _unique([r.messages for r in reader(path, stats=stats)], stats)

    readers = {
        "jsonl": read_prompts,
        "hh-rlhf": prompts_of(read_hh_rlhf),
        "oasst": read_oasst_prompts,
        "self-instruct": prompts_of(read_self_instruct),
    }
    return _load(spec, readers, "prompts", stats=stats)


# ---------------------------------------------------------------------------------------
# Train/eval split


def prompt_key(record) -> str:
    """What must not be on both sides: the opening user turn. Keying on it (not the whole
    conversation) also keeps together the turns of one OASST tree and HH-RLHF conversations
    that start the same way."""
    messages = record if isinstance(record, list) else record.messages
    return next((m["content"] for m in messages if m["role"] == "user"), json.dumps(messages))


def split_by_prompt(records: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, eval) split of Demonstrations, Comparisons or prompts by hashing
    the prompt: a prompt is on one side only, and a record's side depends only on its prompt
    and the seed (not on the order or the other records). If hashing leaves eval empty while
    eval_fraction > 0, the prompt with the smallest hash is moved to eval (tiny data sets)."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")

    def bucket(key: str) -> float:  # uniform in [0, 1), a pure function of (seed, prompt)
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    buckets = {key: bucket(key) for key in {prompt_key(r) for r in records}}
    to_eval = {key for key, b in buckets.items() if b < eval_fraction}
    if eval_fraction > 0 and not to_eval and len(buckets) >= 2:
        to_eval = {min(buckets, key=buckets.get)}
    train = [r for r in records if prompt_key(r) not in to_eval]
    evaluation = [r for r in records if prompt_key(r) in to_eval]
    return train, evaluation
