"""Every container gives the same records as the JSONL file: parquet, arrow, CSV, a JSON array, gzipped
JSONL, `save_to_disk` folders (with @split) and a hub dataset in the local cache (a fake entry built
here). Errors in a dataset name its row index."""

import gzip
import json

import datasets
import pyarrow as pa
import pytest

from rlhfkit.data import DataError, ReadStats, load_comparisons, load_demonstrations, load_prompts


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


PAIRS = [  # TRL conversational preference rows, with a "source" and an extra column
    {"prompt": [user(f"Question {i}?")], "chosen": [assistant(f"Good {i}.")], "rejected": [assistant(f"Bad {i}.")],
     "source": f"subset-{i % 2}", "id": i}
    for i in range(5)
]  # fmt: skip


@pytest.fixture()
def pairs_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def test_parquet_arrow_json_array_and_gzip_equal_jsonl(tmp_path, pairs_jsonl):
    expected = load_comparisons(str(pairs_jsonl))
    table = pa.Table.from_pylist(PAIRS)
    datasets.Dataset(table).to_parquet(str(tmp_path / "pairs.parquet"))
    with pa.ipc.new_stream(str(tmp_path / "pairs.arrow"), table.schema) as writer:  # as save_to_disk writes them
        writer.write_table(table)
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        f.write(pairs_jsonl.read_text())
    for name in ("pairs.parquet", "pairs.arrow", "pairs.json", "pairs.jsonl.gz"):
        stats = ReadStats()
        assert load_comparisons(str(tmp_path / name), stats=stats) == expected, name
        assert stats.records == len(PAIRS)
    assert [c.source for c in expected] == [r["source"] for r in PAIRS]


def test_save_to_disk_folder_with_split(tmp_path, pairs_jsonl):
    expected = load_comparisons(str(pairs_jsonl))
    dataset = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train": dataset.select(range(3)), "test": dataset.select(range(3, 5))}).save_to_disk(
        str(tmp_path / "dict")
    )
    dataset.save_to_disk(str(tmp_path / "single"))
    assert load_comparisons(str(tmp_path / "dict") + "@test") == expected[3:]
    assert load_comparisons(str(tmp_path / "dict")) == expected[:3]  # no @split: "train"
    assert load_comparisons(str(tmp_path / "single")) == expected
    with pytest.raises(FileNotFoundError, match="no split 'validation' \\(it has train, test\\)"):
        load_comparisons(str(tmp_path / "dict") + "@validation")


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch, pairs_jsonl):
    """A fake hub-cache entry laid out as huggingface_hub leaves it: refs/main -> snapshots/<commit>/."""
    import huggingface_hub.constants

    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--someone--tiny-prefs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    dataset = datasets.Dataset.from_list(PAIRS)
    dataset.select(range(4)).to_parquet(str(data / "train-00000-of-00001.parquet"))
    dataset.select([4]).to_parquet(str(data / "test-00000-of-00001.parquet"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    expected = load_comparisons(str(pairs_jsonl))
    assert load_comparisons("someone/tiny-prefs@test") == expected[4:]
    assert load_comparisons("someone/tiny-prefs") == expected[:4]
    assert load_comparisons(["someone/tiny-prefs@train", "someone/tiny-prefs@test"]) == expected
    with pytest.raises(FileNotFoundError, match="hf download someone/missing --repo-type dataset"):
        load_comparisons("someone/missing")


def test_score_command_detects_comparisons_in_a_dataset(tmp_path, pairs_jsonl):
    from rlhfkit.reward.commands import input_kind

    datasets.Dataset.from_list(PAIRS).to_parquet(str(tmp_path / "pairs.parquet"))
    datasets.Dataset.from_list([{"prompt": "Hi?", "completion": "Hello."}]).to_parquet(str(tmp_path / "demos.parquet"))
    assert input_kind(str(tmp_path / "pairs.parquet")) == "comparisons"
    assert input_kind(str(tmp_path / "demos.parquet")) == "demonstrations"


def test_csv_prompts_and_demonstrations(tmp_path):
    (tmp_path / "prompts.csv").write_text('prompt,source\nHi?,a\n"Two, words?",\n')
    assert load_prompts(str(tmp_path / "prompts.csv")) == [[user("Hi?")], [user("Two, words?")]]
    (tmp_path / "demos.csv").write_text("prompt,completion,source\nHi?,Hello.,a\n")
    (demo,) = load_demonstrations(str(tmp_path / "demos.csv"))
    assert (demo.messages, demo.response, demo.source) == ([user("Hi?")], "Hello.", "a")


def test_a_bad_dataset_row_is_named_by_its_index(tmp_path):
    rows = [{"prompt": "Hi?", "completion": "Hello."}, {"prompt": "Sky?", "completion": "  "}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "demos.parquet"))
    with pytest.raises(DataError) as err:
        load_demonstrations(str(tmp_path / "demos.parquet"))
    assert str(err.value) == f"{tmp_path / 'demos.parquet'}:1: field 'completion': empty string"


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_prompts(str(tmp_path / "nothing.parquet"))
