"""What the steps call: `load_demonstrations`, `load_comparisons`, `load_prompts` on a spec (a source,
"FORMAT:SOURCE", or a list of them), and the train/eval split by prompt. `stream_demonstrations` and
`stream_comparisons` give the same records one at a time (for `arrow.py`, which writes them to disk)."""

import hashlib
import json
import re
from typing import Iterable, Iterator

import numpy as np

from .containers import log
from .formats import DEFAULT_SCORE_RANGE, iter_comparisons, iter_demonstrations, read_prompts
from .hh_rlhf import iter_hh_rlhf, iter_hh_rlhf_demonstrations, read_hh_rlhf
from .oasst import read_oasst_comparisons, read_oasst_demonstrations, read_oasst_prompts
from .records import Comparison, Demonstration, ReadStats
from .self_instruct import iter_self_instruct, read_self_instruct

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
    return list(_stream(spec, readers, kind, **kwargs))


def _stream(spec, readers: dict, kind: str, **kwargs) -> Iterator:
    """The records of every source of `spec`, one at a time (OASST's tree walk gives its file's records at once)."""
    for one in spec if isinstance(spec, (list, tuple)) else [spec]:
        fmt, path = parse_spec(one)
        if fmt not in readers:
            raise ValueError(f"{one!r}: the {fmt} format has no {kind} (use one of {', '.join(readers)})")
        yield from readers[fmt](path, **kwargs)


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


_DEMONSTRATION_READERS = {
    "jsonl": iter_demonstrations,
    "hh-rlhf": iter_hh_rlhf_demonstrations,
    "oasst": read_oasst_demonstrations,
    "self-instruct": iter_self_instruct,
}


def load_demonstrations(spec, *, stats: ReadStats | None = None) -> list[Demonstration]:
    return _load(spec, _DEMONSTRATION_READERS, "demonstrations", stats=stats)


def stream_demonstrations(spec, *, stats: ReadStats | None = None) -> Iterator[Demonstration]:
    """`load_demonstrations`, one record at a time."""
    return _stream(spec, _DEMONSTRATION_READERS, "demonstrations", stats=stats)


def _comparison_readers(score_range) -> dict:
    def jsonl(path, stats):
        return iter_comparisons(path, score_range=score_range, stats=stats)

    return {"jsonl": jsonl, "hh-rlhf": iter_hh_rlhf, "oasst": read_oasst_comparisons}


def load_comparisons(
    spec, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> list[Comparison]:
    return _load(spec, _comparison_readers(score_range), "comparisons", stats=stats)


def stream_comparisons(
    spec, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> Iterator[Comparison]:
    """`load_comparisons`, one record at a time."""
    return _stream(spec, _comparison_readers(score_range), "comparisons", stats=stats)


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


def _bucket(key: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of (seed, prompt key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def eval_mask(keys: Iterable[str], eval_fraction: float, seed: int = 0) -> np.ndarray:
    """For each prompt key, True where its record goes to eval (the rule of `split_by_prompt`). Keys may
    come one at a time (a dataset's key column, read by batches): only one float per record is kept."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    buckets = np.fromiter((_bucket(key, seed) for key in keys), dtype=np.float64)
    to_eval = buckets < eval_fraction
    if eval_fraction > 0 and not to_eval.any() and len(buckets) and buckets.min() != buckets.max():
        to_eval = buckets == buckets.min()  # tiny data sets: the prompt with the smallest hash (its every record)
    return to_eval


def split_by_prompt(records: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, eval) split of Demonstrations, Comparisons or prompts by hashing
    the prompt: a prompt is on one side only, and a record's side depends only on its prompt
    and the seed (not on the order or the other records). If hashing leaves eval empty while
    eval_fraction > 0, the prompt with the smallest hash is moved to eval (tiny data sets)."""
    to_eval = eval_mask((prompt_key(r) for r in records), eval_fraction, seed)
    train = [r for r, e in zip(records, to_eval) if not e]
    evaluation = [r for r, e in zip(records, to_eval) if e]
    return train, evaluation
