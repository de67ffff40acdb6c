"""Large training sets without Python lists: the records of a spec streamed into an arrow file on disk,
tokenised by `Dataset.map` into columns, memory-mapped, and read back a micro-batch at a time.

    record_dataset(spec, kind, cache_dir)          the records (streamed by `Dataset.from_generator`) + a prompt key
    tokenise(records, encode, ...)                 `Dataset.map` of an encoder into token columns
    split_rows(dataset, eval_fraction, seed)       `split_by_prompt`'s train and eval rows, as index arrays
    Rows(dataset, to_item, indices)                a sequence whose items are built when asked for (what DataPlan indexes)
    demonstration_dataset(spec, tokenizer, ...)    SFT's tokenised demonstrations (the reward model's comparisons:
                                                   `reward.encoding.comparison_dataset`)

Both files go to `cache_dir` (a run's `data/` folder), named by what they were made from: the sources' names,
sizes and modification times, the reader's settings, the tokenizer and the encoding settings. A resumed run
finds them and reads nothing again; a changed file or setting makes new ones. Python holds one writer batch
of records at a time (OASST's tree walk excepted: it gives a file's records at once), and the token columns
stay on disk (memory-mapped) apart from a lengths array and the rows of the current step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from .load import eval_mask, parse_spec, prompt_key, stream_comparisons, stream_demonstrations
from .records import Comparison, Demonstration

KINDS = ("demonstrations", "comparisons")


def _features(kind: str):
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    if kind == "demonstrations":
        return Features({"messages": messages, "response": Value("string"), "source": Value("string"), "key": Value("string")})
    return Features({
        "messages": messages, "responses": List(Value("string")), "ranking": List(List(Value("int64"))),
        "scores": List(Value("float64")), "source": Value("string"), "meta": Value("string"), "key": Value("string"),
    })  # fmt: skip


def _records(request: str):
    """The generator `Dataset.from_generator` runs: one arrow row per record (`request` is JSON, so that its
    hash, which names the cached file, is plain)."""
    r = json.loads(request)
    if r["kind"] == "demonstrations":
        for d in stream_demonstrations(r["spec"]):
            yield {"messages": d.messages, "response": d.response, "source": d.source, "key": prompt_key(d)}
        return
    score_range = tuple(r["score_range"]) if r["score_range"] is not None else None
    for c in stream_comparisons(r["spec"], score_range=score_range):
        yield {
            "messages": c.messages, "responses": c.responses, "ranking": c.ranking, "scores": c.scores,
            "source": c.source, "meta": json.dumps(c.meta), "key": prompt_key(c),
        }  # fmt: skip


def record_from_row(row: dict, kind: str) -> Demonstration | Comparison:
    """The record an arrow row of `record_dataset` was made from."""
    if kind == "demonstrations":
        return Demonstration(row["messages"], row["response"], row["source"])
    return Comparison(row["messages"], row["responses"], row["ranking"], row["source"], row["scores"], json.loads(row["meta"]))


def _stamp(spec) -> list:
    """What a cached file depends on in the sources: name, size and modification time of every file."""
    out = []
    for one in spec if isinstance(spec, (list, tuple)) else [spec]:
        fmt, source = parse_spec(one)
        path = Path(source.rpartition("@")[0] if "@" in Path(source).name and not Path(source).exists() else source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        out.append([fmt, str(path.resolve()) if files else source, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]])
    return out


def record_dataset(spec, kind: str, cache_dir, *, score_range: tuple[float, float] | None = None):
    """The records of `spec` as a memory-mapped `datasets.Dataset` in `cache_dir`, made once: the readers
    stream them into `Dataset.from_generator`, which writes them by batches. A bad record raises the
    readers' `DataError` (file, line or row, field), as `load_demonstrations` / `load_comparisons` do."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    spec = list(spec) if isinstance(spec, (list, tuple)) else str(spec)
    request = {"kind": kind, "spec": spec, "stamp": _stamp(spec), "version": __version__}
    if kind == "comparisons":
        request["score_range"] = list(score_range) if score_range is not None else None
    try:
        return datasets.Dataset.from_generator(
            _records, gen_kwargs={"request": json.dumps(request)}, features=_features(kind), cache_dir=str(cache_dir)
        )
    except DatasetGenerationError as e:  # the reader's own error (DataError, missing file) says what is wrong
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def _tokenizer_fingerprint(tokenizer) -> str:
    # Kept rather than datasets' own hash of the tokenizer: that one changes once a fast tokenizer has been
    # used (its Rust state, e.g. truncation), so a resumed run would not find its file.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(
        json.dumps([type(tokenizer).__name__, text, tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode()
    ).hexdigest()


def tokenise(records, encode: Callable[[dict], dict], features: dict, *, name: str, tokenizer, settings: dict, cache_dir):
    """`records.map(encode)` into the token columns `features` (a dict of `datasets` features), written to
    `cache_dir/NAME-FINGERPRINT.arrow` and memory-mapped. The record columns are dropped; `key` is kept and
    `row` (the record's row in `records`) added. The fingerprint covers the records, the tokenizer and
    `settings`, so the same inputs find the same file."""
    from datasets import Features, Value

    fingerprint = hashlib.sha256(
        json.dumps([records._fingerprint, name, _tokenizer_fingerprint(tokenizer), settings, __version__], sort_keys=True).encode()
    ).hexdigest()[:16]

    def encode_batch(batch: dict, indices: list[int]) -> dict:  # batched: one arrow conversion per 1000 rows
        columns = [c for c in batch if c != "key"]
        out = [encode(dict(zip(columns, values))) for values in zip(*(batch[c] for c in columns))]
        return {"row": indices, **{k: [o[k] for o in out] for k in features}}

    return records.map(
        encode_batch,
        batched=True,
        with_indices=True,
        remove_columns=[c for c in records.column_names if c != "key"],
        features=Features({"key": Value("string"), "row": Value("int64"), **features}),
        cache_file_name=str(Path(cache_dir) / f"{name}-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc=f"tokenising {name}",
    )


def split_rows(dataset, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows) of a dataset with a `key` column: the split `split_by_prompt` makes of the
    same records, in their order. The keys are read by arrow batches; only one float per row is kept."""

    def keys():
        for table in dataset.select_columns(["key"]).with_format("arrow").iter(batch_size=10_000):
            yield from table.column("key").to_pylist()

    to_eval = eval_mask(keys(), eval_fraction, seed)
    return np.flatnonzero(~to_eval), np.flatnonzero(to_eval)


class Rows(Sequence):
    """Rows `indices` of a (memory-mapped) dataset as a sequence of items, each built by `to_item` when
    asked for: a data plan indexes a micro-batch at a time, so the whole set is never in Python objects."""

    def __init__(self, dataset, to_item: Callable[[dict], Any], indices: Sequence[int] | None = None):
        self.dataset, self.to_item = dataset, to_item
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.to_item(self.dataset[int(self.indices[i])])

    def column(self, name: str) -> np.ndarray:
        """A numeric column over these rows, as one numpy array (e.g. the lengths for the data plan)."""
        return np.asarray(self.dataset.with_format("numpy")[name])[self.indices]

    def subset(self, positions) -> "Rows":
        """The rows at `positions` of this sequence."""
        return Rows(self.dataset, self.to_item, self.indices[np.asarray(positions, dtype=np.int64)])


# ---------------------------------------------------------------------------------------
# SFT's demonstrations


def demonstration_dataset(spec, tokenizer, *, max_length: int, max_prompt_share: float, cache_dir):
    """The demonstrations of `spec`, tokenised as `tokens.encode_example` does, as a memory-mapped dataset
    with the columns input_ids, labels, prompt_length, truncated, length (tokens), trained (trained tokens),
    key (the prompt key, for `split_rows`) and row. `example_from_row` turns a row back into an Example."""
    from datasets import List, Value

    from ..tokens import IGNORE_INDEX, encode_example

    def encode(row: dict) -> dict:
        e = encode_example(tokenizer, row["messages"], row["response"], max_length, max_prompt_share)
        trained = sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)
        return {"input_ids": e.input_ids, "labels": e.labels, "prompt_length": e.prompt_length,
                "truncated": e.truncated, "length": len(e.input_ids), "trained": trained}  # fmt: skip

    features = {
        "input_ids": List(Value("int32")), "labels": List(Value("int32")), "prompt_length": Value("int32"),
        "truncated": Value("bool"), "length": Value("int32"), "trained": Value("int32"),
    }  # fmt: skip
    records = record_dataset(spec, "demonstrations", cache_dir)
    settings = {"max_length": max_length, "max_prompt_share": max_prompt_share}
    return tokenise(records, encode, features, name="sft-examples", tokenizer=tokenizer, settings=settings, cache_dir=cache_dir)


def example_from_row(row: dict):
    from ..tokens import Example

    return Example(row["input_ids"], row["labels"], row["prompt_length"], row["truncated"])

