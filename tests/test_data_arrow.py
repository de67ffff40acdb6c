"""Large training sets through `datasets` (rlhfkit/data/arrow.py): records streamed into arrow files,
tokenised by `Dataset.map`, memory-mapped, split by prompt on a key column, and the SFT and reward steps
trained on them give the numbers of the list path. Tiny random Llama only."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import RewardConfig, SFTConfig
from rlhfkit.data import (
    DataError,
    Rows,
    demonstration_dataset,
    example_from_row,
    load_comparisons,
    load_demonstrations,
    record_dataset,
    record_from_row,
    split_by_prompt,
    split_rows,
    stream_comparisons,
    stream_demonstrations,
    write_jsonl,
)
from rlhfkit.models import load_tokenizer
from rlhfkit.reward import load_reward_model, run_reward
from rlhfkit.reward import training as reward_training
from rlhfkit.reward.encoding import comparison_dataset, encoded_from_row
from rlhfkit.sft import encode_all, load_sft_examples, run_sft, train_sft
from rlhfkit.training import DataPlan, read_metrics

from conftest import WORDS


def words(rng, lo=2, hi=8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_demos(path: Path, n: int = 80, seed: int = 0) -> Path:
    """Demonstrations whose prompts repeat (several records per prompt), some with a system turn or two user turns."""
    rng = random.Random(seed)
    prompts = [words(rng) + f" {i}" for i in range(n // 3)]
    with path.open("w") as f:
        for i in range(n):
            prompt = rng.choice(prompts)
            if i % 5 == 0:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": words(rng)}, {"role": "user", "content": words(rng)}]
                record = {"messages": [*messages, {"role": "assistant", "content": words(rng)}]}
            else:
                record = {"prompt": prompt, "response": words(rng), **({"system": "be brief"} if i % 7 == 0 else {})}
            f.write(json.dumps(record) + "\n")
    return path


def write_comparisons(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Every comparison shape: pairs (one identical, skipped), K-wise with ties and scores, a K-wise tie of all
    (no strict pair), and ratings of one prompt spread over the file."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = words(rng) + f" {i % (n // 2)}"
            if i % 4 == 0:
                k = rng.randint(3, 4)
                scores = [float(rng.randint(1, 7)) for _ in range(k)]
                ranking = sorted(range(k), key=lambda j: -scores[j])
                record = {"prompt": prompt, "responses": [words(rng) for _ in range(k)], "ranking": [ranking[0], ranking[1:]]}
                if i % 8 == 0:
                    record["meta"] = {"annotator": f"a{i}"}
            elif i == 5:
                record = {"prompt": prompt, "responses": [words(rng), words(rng)], "ranking": [[0, 1]]}  # no strict pair
            elif i == 7:
                record = {"prompt": prompt, "chosen": "same", "rejected": "same"}  # skipped: identical
            elif i % 9 == 0:
                record = {"prompt": "rated prompt", "response": words(rng), "score": rng.randint(1, 7)}
            else:
                record = {"prompt": prompt, "chosen": words(rng), "rejected": words(rng), "source": "pairs"}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


# ----------------------------------------------------------------------------- records and the split


def test_records_through_arrow_equal_the_loaded_lists(tmp_path):
    demos, comparisons = write_demos(tmp_path / "d.jsonl"), write_comparisons(tmp_path / "c.jsonl")
    ds = record_dataset(str(demos), "demonstrations", tmp_path / "cache")
    assert [record_from_row(row, "demonstrations") for row in ds] == load_demonstrations(demos)
    ds = record_dataset(str(comparisons), "comparisons", tmp_path / "cache", score_range=(1, 7))
    assert [record_from_row(row, "comparisons") for row in ds] == load_comparisons(comparisons)
    # A container too (parquet, read by `datasets`), and a list spec.
    import datasets

    plain = [json.loads(line) for line in demos.read_text().splitlines()[:20] if '"messages"' not in line]
    datasets.Dataset.from_list([{"system": None, **r} for r in plain]).to_parquet(tmp_path / "d.parquet")
    spec = [str(tmp_path / "d.parquet"), str(demos)]
    ds = record_dataset(spec, "demonstrations", tmp_path / "cache")
    assert [record_from_row(row, "demonstrations") for row in ds] == load_demonstrations(spec)


def test_readers_stream_their_records(tmp_path):
    """A reader gives its records one at a time: those before a bad line come out before its error. Ratings wait
    for the end of the file (a prompt's ratings may be anywhere), and what follows them keeps the file's order."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(3)) + "not json\n")
    records = stream_demonstrations(str(path))
    assert [next(records).messages[0]["content"] for _ in range(3)] == ["p0", "p1", "p2"]
    with pytest.raises(DataError, match=":4:"):
        next(records)

    lines = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "r", "response": "one", "score": 2},
             {"prompt": "b", "chosen": "x", "rejected": "y"}, {"prompt": "r", "response": "two", "score": 5}]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [c.messages[0]["content"] for c in stream_comparisons(str(path))] == ["a", "r", "b"]
    assert list(stream_comparisons(str(path))) == load_comparisons(path)


@pytest.mark.parametrize("fraction,seed", [(0.2, 0), (0.5, 3), (0.0, 1), (0.001, 2)])
def test_split_on_the_key_column_is_split_by_prompt(tmp_path, fraction, seed):
    for kind, path, load in [("demonstrations", write_demos(tmp_path / "d.jsonl"), load_demonstrations),
                             ("comparisons", write_comparisons(tmp_path / "c.jsonl"), load_comparisons)]:  # fmt: skip
        records = load(path)
        train, evaluation = split_by_prompt(records, fraction, seed)
        train_rows, eval_rows = split_rows(record_dataset(str(path), kind, tmp_path / "cache", score_range=(1, 7)), fraction, seed)
        assert [records[i] for i in train_rows] == train and [records[i] for i in eval_rows] == evaluation
        assert fraction == 0 or evaluation  # 0.001: the tiny-set rule moved one prompt to eval


def test_a_bad_record_names_file_line_and_field(tmp_path):
    path = write_demos(tmp_path / "d.jsonl", n=10)
    lines = path.read_text().splitlines()
    lines[6] = json.dumps({"prompt": "fine", "response": 3})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        record_dataset(str(path), "demonstrations", tmp_path / "cache")
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 7, "response")
    with pytest.raises(FileNotFoundError, match="no such file"):
        record_dataset(str(tmp_path / "missing.jsonl"), "demonstrations", tmp_path / "cache")


# ----------------------------------------------------------------------------- tokenised columns and the cache


def test_tokenised_rows_are_the_encoded_lists(tmp_path, tokenizer):
    demos = write_demos(tmp_path / "d.jsonl")
    cfg = SFTConfig(model="x", data=str(demos), max_length=24, max_prompt_share=0.5)
    examples, n_cut = encode_all(tokenizer, load_demonstrations(demos), cfg)
    ds = demonstration_dataset(str(demos), tokenizer, max_length=24, max_prompt_share=0.5, cache_dir=tmp_path / "cache")
    rows = Rows(ds, example_from_row)
    assert list(rows) == examples and 0 < n_cut == rows.column("truncated").sum()
    assert rows.column("length").tolist() == [len(e) for e in examples]

    comparisons = write_comparisons(tmp_path / "c.jsonl")
    rcfg = RewardConfig(model="x", data=str(comparisons), max_length=24, margin_scale=0.5)
    encoded = [reward_training.encode_comparison(tokenizer, c, 24, rcfg.max_prompt_share, 0.5) for c in load_comparisons(comparisons)]
    _, ds = comparison_dataset(
        str(comparisons), tokenizer, max_length=24, max_prompt_share=rcfg.max_prompt_share, margin_scale=0.5,
        score_range=(1, 7), cache_dir=tmp_path / "cache",
    )  # fmt: skip
    from_rows = list(Rows(ds, encoded_from_row))
    for i, (a, b) in enumerate(zip(from_rows, encoded, strict=True)):
        assert (a.rows, a.pairs, a.weights, a.margins, a.truncated, a.index) == (b.rows, b.pairs, b.weights, b.margins, b.truncated, i)
    assert any(not e.pairs for e in from_rows) and any(len(e.rows) > 2 for e in from_rows)


def test_the_files_are_reused_by_another_process_and_remade_when_the_data_changes(tmp_path, tiny_model_dir, tokenizer):
    demos = write_demos(tmp_path / "d.jsonl")
    build = dict(max_length=32, max_prompt_share=0.5, cache_dir=tmp_path / "cache")
    first = demonstration_dataset(str(demos), tokenizer, **build).cache_files
    code = (
        "import sys; from rlhfkit.models import load_tokenizer; from rlhfkit.data import demonstration_dataset;"
        f"print(demonstration_dataset({str(demos)!r}, load_tokenizer({str(tiny_model_dir)!r}), max_length=32, "
        f"max_prompt_share=0.5, cache_dir={str(tmp_path / 'cache')!r}).cache_files[0]['filename'])"
    )
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    assert again == first[0]["filename"]  # a resumed run (a new process) finds the same file
    arrow_files = set((tmp_path / "cache").rglob("*.arrow"))
    with demos.open("a") as f:
        f.write(json.dumps({"prompt": "one more", "response": "row"}) + "\n")
    changed = demonstration_dataset(str(demos), tokenizer, **build)
    assert changed.cache_files != first and len(changed) == len(load_demonstrations(demos))
    assert len(set((tmp_path / "cache").rglob("*.arrow")) - arrow_files) == 2  # new records and new tokens
    other = demonstration_dataset(str(demos), tokenizer, **{**build, "max_length": 16})
    assert max(Rows(other, example_from_row).column("length")) == 16


def test_data_plan_from_a_lengths_array_gives_the_same_order(tmp_path, tokenizer):
    demos = write_demos(tmp_path / "d.jsonl")
    rows = Rows(demonstration_dataset(str(demos), tokenizer, max_length=32, max_prompt_share=0.5, cache_dir=tmp_path / "c"), example_from_row)
    examples = list(rows)
    common = dict(batch_size=2, grad_accum=2, num_processes=1, process_index=0, seed=4, length_window=2)
    by_function = DataPlan(items=examples, length=len, **common)
    by_array = DataPlan(items=rows, lengths=rows.column("length"), **common)
    for step in (0, 3, 25):  # 25: a later epoch
        assert by_array.step(step).micro_batches == by_function.step(step).micro_batches
    assert by_array.epoch_order(0) != list(range(len(rows)))


def test_sample_flat_is_the_sample_of_the_whole_list():
    items = [[], ["a"], ["b", "c", "d"], [], ["e"], ["f", "g"]]
    flat = [x for item in items for x in item]
    for seed in range(5):
        sample, sampled = reward_training._sample_flat(items, lambda item: item, 3, seed)
        assert sampled and sample == random.Random(seed).sample(flat, 3)
    assert reward_training._sample_flat(items, lambda item: item, 7, 0) == (flat, False)


# ----------------------------------------------------------------------------- the steps: same numbers as the lists


def sft_config(tiny_model_dir, data, out, **overrides) -> SFTConfig:
    fields = dict(
        model=str(tiny_model_dir), data=str(data), output_dir=str(out), batch_size=4, grad_accum=2, max_steps=4,
        learning_rate=3e-3, eval_every=2, checkpoint_every=2, eval_fraction=0.2, precision="fp32", max_length=48,
        group_by_length=True,
    )  # fmt: skip
    fields.update(overrides)
    return SFTConfig(**fields)


def _losses(run: Path) -> list[tuple]:
    return [(m["phase"], m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl")]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sft_through_arrow_equals_sft_on_lists_and_resumes(tiny_model_dir, tmp_path, tokenizer):
    demos = write_demos(tmp_path / "d.jsonl", n=90)
    listed = sft_config(tiny_model_dir, demos, tmp_path / "lists")
    train, evaluation = split_by_prompt(load_demonstrations(demos), listed.eval_fraction, seed=listed.seed)
    train_sft(listed, tokenizer, encode_all(tokenizer, train, listed)[0], encode_all(tokenizer, evaluation, listed)[0])

    arrow = sft_config(tiny_model_dir, demos, tmp_path / "arrow")
    train_rows, eval_examples = load_sft_examples(arrow, tokenizer)
    assert isinstance(train_rows, Rows) and eval_examples == encode_all(tokenizer, evaluation, arrow)[0]
    run_sft(arrow, stop_after=3)  # "crash" after step 3 (checkpoint at 2), then resume
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "arrow" / "data").rglob("*.arrow")}
    assert len(files) == 2  # the records and the tokens
    run_sft(arrow)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "arrow" / "data").rglob("*.arrow")} == files  # reused
    losses = _losses(tmp_path / "arrow")
    assert [step for phase, step, _ in losses if phase == "train"] == [1, 2, 3, 4] and losses == _losses(tmp_path / "lists")
    _assert_same_weights(load_file(str(tmp_path / "arrow" / "final" / "model.safetensors")), load_file(str(tmp_path / "lists" / "final" / "model.safetensors")))


def _list_reward_data(cfg: RewardConfig, tokenizer) -> reward_training.RewardData:
    """The reward step's data as it was built before the arrow path: lists."""
    comparisons = load_comparisons(cfg.data, score_range=cfg.score_range)
    train_cmp, eval_cmp = split_by_prompt(comparisons, cfg.eval_fraction, seed=cfg.seed)
    eval_cmp = eval_cmp[: cfg.max_eval_comparisons]
    train_enc, _, _ = reward_training._encode_all(tokenizer, train_cmp, cfg)
    eval_enc, _, _ = reward_training._encode_all(tokenizer, eval_cmp, cfg)
    eval_cmp = [c for c in eval_cmp if c.pairs()]
    return reward_training.RewardData(train_enc, train_cmp, eval_cmp, eval_enc, sum(len(e.pairs) for e in train_enc))


def test_reward_through_arrow_equals_reward_on_lists(tiny_model_dir, tmp_path, monkeypatch):
    data = write_comparisons(tmp_path / "c.jsonl", n=80)
    fields = dict(
        model=str(tiny_model_dir), data=str(data), precision="fp32", eval_fraction=0.25, max_length=48, batch_size=4,
        learning_rate=2e-3, max_steps=4, eval_every=2, checkpoint_every=0, margin_scale=0.5, group_by_length=True,
        max_reference_examples=7,  # smaller than the responses: the normalisation samples
    )  # fmt: skip
    arrow = load_reward_model(run_reward(RewardConfig(output_dir=str(tmp_path / "arrow"), **fields)))
    assert any((tmp_path / "arrow" / "data").rglob("reward-comparisons-*.arrow"))
    monkeypatch.setattr(reward_training, "load_reward_data", _list_reward_data)
    listed = load_reward_model(run_reward(RewardConfig(output_dir=str(tmp_path / "lists"), **fields)))
    assert not (tmp_path / "lists" / "data").exists()
    losses = _losses(tmp_path / "arrow")
    assert [step for phase, step, _ in losses if phase == "train"] == [1, 2, 3, 4] and losses == _losses(tmp_path / "lists")
    _assert_same_weights(arrow[0].state_dict(), listed[0].state_dict())
    stats = [{k: s[k] for k in ("mean", "std", "mean_measured_on", "train_comparisons", "train_pairs")} for s in (arrow[2], listed[2])]
    assert stats[0] == stats[1] and "sample of 7" in stats[0]["mean_measured_on"]


# ----------------------------------------------------------------------------- a large file


def _short_demos(path: Path, n: int) -> Path:
    rng, vocab = random.Random(0), WORDS[:60]
    write_jsonl(path, ({"prompt": f"{rng.choice(vocab)} {rng.choice(vocab)} {i}", "response": rng.choice(vocab)} for i in range(n)))
    return path


def _peak_heap(fn) -> int:
    """The peak of the Python heap (tracemalloc: every Python object, numpy arrays too) while `fn` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_file_is_trained_on_without_python_lists(tiny_model_dir, tmp_path, tokenizer):
    """Read, tokenise, split and train a step on 1k and on 9k short demonstrations: the Python heap's peak grows
    by a small fraction of what the list path keeps for the 8k rows more (measured on 1k and 2k rows). A
    constant part (the model, the loop) cancels out. (tracemalloc slows Python ~10x: hence 9k rows;
    benchmarks/data_memory.py measures 200k rows in a fresh process.)"""
    small, large = _short_demos(tmp_path / "small.jsonl", 1000), _short_demos(tmp_path / "large.jsonl", 9000)
    trained = []

    def arrow_step(path: Path):
        cfg = sft_config(tiny_model_dir, path, tmp_path / path.stem, max_steps=1, eval_fraction=0.01, max_eval_examples=8, checkpoint_every=0)
        train_rows, eval_examples = load_sft_examples(cfg, tokenizer)
        train_sft(cfg, tokenizer, train_rows, eval_examples, stop_after=1)
        trained.append((len(train_rows), [m["step"] for m in read_metrics(tmp_path / path.stem / "metrics.jsonl") if m["phase"] == "train"]))

    arrow_step(_short_demos(tmp_path / "warm-up.jsonl", 200))  # first-time costs (imports, caches) out of the way
    arrow_growth = _peak_heap(lambda: arrow_step(large)) - _peak_heap(lambda: arrow_step(small))
    assert trained[1][0] > 0.97 * 9000 and trained[1][1] == [1]

    kept, cfg = [], sft_config(tiny_model_dir, small, tmp_path / "lists")
    lists_1k = _peak_heap(lambda: kept.append(encode_all(tokenizer, load_demonstrations(small), cfg)))
    lists_2k = _peak_heap(lambda: kept.append(encode_all(tokenizer, load_demonstrations([small, small]), cfg)))
    lists_per_row = (lists_2k - lists_1k) / 1000
    assert lists_per_row > 500  # records and token lists: bytes a row
    bound = lists_per_row * 8000 / 5
    assert arrow_growth < bound, f"the heap grew {arrow_growth / 2**20:.2f} MiB for 8k rows more; the lists take {5 * bound / 2**20:.1f} MiB"


def test_separate_eval_files_give_the_lists_of_the_old_path(tmp_path, tokenizer):
    demos, held_out = write_demos(tmp_path / "d.jsonl"), write_demos(tmp_path / "e.jsonl", n=30, seed=1)
    cfg = SFTConfig(model="x", data=str(demos), eval_data=str(held_out), output_dir=str(tmp_path / "sft"), max_length=32, max_eval_examples=20)
    train, evaluation = load_sft_examples(cfg, tokenizer)
    assert list(train) == encode_all(tokenizer, load_demonstrations(demos), cfg)[0]
    assert evaluation == encode_all(tokenizer, load_demonstrations(held_out)[:20], cfg)[0]

    comparisons, held_out = write_comparisons(tmp_path / "c.jsonl"), write_comparisons(tmp_path / "f.jsonl", n=40, seed=1)
    rcfg = RewardConfig(model="x", data=str(comparisons), eval_data=str(held_out), output_dir=str(tmp_path / "rm"), max_length=32)
    data = reward_training.load_reward_data(rcfg, tokenizer)
    train_enc = reward_training._encode_all(tokenizer, load_comparisons(comparisons), rcfg)[0]
    eval_cmp = [c for c in load_comparisons(held_out) if c.pairs()]
    assert [(e.rows, e.pairs, e.weights) for e in data.train] == [(e.rows, e.pairs, e.weights) for e in train_enc]
    assert list(data.train_comparisons) == load_comparisons(comparisons) and data.eval_comparisons == eval_cmp
    assert [e.rows for e in data.eval_encoded] == [e.rows for e in reward_training._encode_all(tokenizer, eval_cmp, rcfg)[0]]
    assert data.n_pairs == sum(len(e.pairs) for e in train_enc)


def test_the_frozen_feature_cache_knows_a_dataset_item_again(tmp_path, tiny_model_dir, tokenizer):
    """Rows builds a new object at each access: the cache keys it by its row, not its id (with ids, every step
    would run the lower blocks again, and a freed object's id reused by another comparison would hit)."""
    from rlhfkit.reward import build_reward_model, rows_to_batch
    from rlhfkit.reward.frozen_features import FrozenFeatureCache, cache_size_bytes, cache_tokens

    _, ds = comparison_dataset(
        str(write_comparisons(tmp_path / "c.jsonl")), tokenizer, max_length=32, max_prompt_share=0.5, margin_scale=0.0,
        score_range=(1, 7), cache_dir=tmp_path / "cache",
    )  # fmt: skip
    rows = Rows(ds, encoded_from_row)
    rm = build_reward_model(str(tiny_model_dir), tokenizer, train_top_layers=1)
    cache, calls, lower = FrozenFeatureCache(split=1, tokens=cache_tokens(rows)), [], rm.frozen_features
    rm.frozen_features = lambda *args, **kwargs: calls.append(args) or lower(*args, **kwargs)
    batch = rows_to_batch([r for e in (rows[0], rows[1]) for r in e.rows], tokenizer.pad_token_id)
    first = cache.batch(rm, [rows[0], rows[1]], batch)
    again = cache.batch(rm, [rows[0], rows[1]], batch)  # new objects, the same rows
    assert len(calls) == 1 and torch.equal(first, again) and set(cache.features) == {0, 1}
    assert cache_size_bytes(rows, 8) == cache_size_bytes(list(rows), 8) == sum(e.tokens for e in rows) * 8 * 4
    kept = [f for key in (0, 1) for f in cache.features[key]]  # every row a slice of the one buffer, in order
    assert all(f.untyped_storage().data_ptr() == cache.store.untyped_storage().data_ptr() for f in kept)
    assert cache.used == rows[0].tokens + rows[1].tokens and torch.equal(torch.cat(kept), cache.store[: cache.used])
    # With shared prompts the columns count the packed rows' tokens, as a list of the items does.
    _, shared = comparison_dataset(
        str(tmp_path / "c.jsonl"), tokenizer, max_length=32, max_prompt_share=0.5, margin_scale=0.0, score_range=(1, 7),
        cache_dir=tmp_path / "cache", share_prompt=True,
    )  # fmt: skip
    packed = Rows(shared, encoded_from_row)
    assert all(e.prompt_tokens > 0 for e in packed) and [e.index for e in packed] == list(range(len(packed)))
    assert cache_tokens(packed, packed=True) == cache_tokens(list(packed), packed=True) == sum(e.packed_tokens for e in packed)
    assert cache_tokens(packed, packed=True) < cache_tokens(packed)
    assert list(reward_training.comparison_lengths(packed, packed=True)) == [e.packed_tokens for e in packed]
