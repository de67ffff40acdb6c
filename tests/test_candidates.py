"""`rlhfkit candidates`: K per prompt, round-robin over models, model names and sampling kept,
duplicates re-sampled once then dropped, stable ids, a task file `label serve` reads, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import build_tiny_model
from rlhfkit.candidates import make_candidates, run_candidates, split_k, task_id
from rlhfkit.config import CandidatesConfig, ConfigError, load_config
from rlhfkit.data import DataError
from rlhfkit.generate import Sample
from rlhfkit.labelling.tasks import load_tasks

PROMPTS = ["Name a river.", "What is an apple?", {"prompt": "Say yes.", "system": "Be brief."}, "Name a river.", "Thanks?"]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="session")
def second_model_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder whose final/ is a second tiny model (same tokenizer, other seed)."""
    run = tmp_path_factory.mktemp("run-b")
    shutil.copytree(tiny_model_dir, run / "final")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_model(run / "final", vocab_size=vocab, seed=1)
    return run


def config(tmp_path, generation: dict | None = None, **fields) -> CandidatesConfig:
    base = {"prompts": str(write_prompts(tmp_path / "prompts.jsonl")), "output": str(tmp_path / "tasks.jsonl"), "precision": "fp32"}
    generation = {"max_new_tokens": 8, **(generation or {})}
    return load_config(CandidatesConfig, overrides={**base, **fields, "generation": generation})


def test_split_k_round_robin():
    assert split_k(4, 2) == [2, 2]
    assert split_k(5, 2) == [3, 2]
    assert split_k(4, 3) == [2, 1, 1]
    assert split_k(3, 1) == [3]


def test_k_per_prompt_models_and_sampling_kept(tmp_path, tiny_model_dir, second_model_run):
    a, b = str(tiny_model_dir), str(second_model_run)
    cfg = config(tmp_path, models=[a, b], k=5, generation={"temperature": 1.0, "top_p": 1.0, "seed": 7})
    out = run_candidates(cfg, progress=False)

    raw = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = load_tasks(out)  # exactly what `rlhfkit label serve --tasks` reads
    assert len(tasks) == 4  # the repeated prompt is dropped
    assert [t.id for t in tasks] == [task_id(r["messages"]) for r in raw]
    assert tasks[2].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say yes."}]
    for t in tasks:
        assert t.k == 5 and len(set(t.responses)) == 5 and all(r.strip() for r in t.responses)
        assert t.models == [a, b, a, b, a]  # round-robin: 3 + 2
        for model, sampling in zip(t.models, t.sampling):
            assert sampling == {**cfg.generation.model_dump(), "seed": 7 + (model == b)}

    # Stable ids and output: the same run again gives the same file.
    again = run_candidates(cfg.model_copy(update={"output": str(tmp_path / "again.jsonl")}), progress=False)
    assert again.read_text() == out.read_text()


def test_greedy_with_one_model_gives_no_task(tmp_path, tiny_model_dir):
    # Greedy decoding repeats itself: each task keeps 1 response (re-sampling once does not help),
    # so every prompt is dropped. (The tiny model's greedy answer is even blank: dropped as empty.)
    cfg = config(tmp_path, models=[str(tiny_model_dir)], k=2, generation={"temperature": 0})
    records, stats = make_candidates(cfg, progress=False)
    assert records == [] and stats.prompts == 4 and stats.dropped_tasks == 4
    assert stats.resampled == stats.duplicates + stats.empty == stats.dropped >= 4
    with pytest.raises(ValueError, match="no task has 2 distinct"):
        run_candidates(cfg, progress=False)


def test_duplicates_are_resampled_once_then_dropped(tmp_path, monkeypatch):
    """Scripted samples: (seed, call) -> texts per prompt; model A = seed 0, model B = seed 1, re-samples + 1000."""
    script = {
        0: [["x", "x"]],  # A: one duplicate
        1000: [["y"]],  # A re-sample: new
        1: [[" x ", ""]],  # B: a duplicate of A's (after stripping) and an empty one
        1001: [["z", "y"]],  # B re-samples: z is new, y again a duplicate -> dropped
    }
    calls = []

    def fake_generate(model, tokenizer, prompts, gen, num_samples=1, progress=True):
        calls.append((model, gen.seed, num_samples, len(prompts)))
        return [[Sample(t, [], True) for t in group] for group in script[gen.seed]]

    import rlhfkit.generate as generate

    monkeypatch.setattr(generate, "load_for_inference", lambda name, precision="bf16": (name, None))
    monkeypatch.setattr(generate, "generate_responses", fake_generate)
    prompts = write_prompts(tmp_path / "one.jsonl", ["Hi?"])
    cfg = load_config(CandidatesConfig, overrides={"models": ["A", "B"], "k": 4, "prompts": str(prompts)})
    [record], stats = make_candidates(cfg, progress=False)
    assert calls == [("A", 0, 2, 1), ("A", 1000, 1, 1), ("B", 1, 2, 1), ("B", 1001, 2, 1)]  # each model loaded once
    assert [(r["text"], r["model"], r["sampling"]["seed"]) for r in record["responses"]] == [("x", "A", 0), ("z", "B", 1001), ("y", "A", 1000)]
    assert (stats.duplicates, stats.empty, stats.resampled, stats.dropped) == (2, 1, 3, 1)


def test_bad_inputs(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"messages": [{"role": "bot", "content": "hi"}]}\n')
    cfg = load_config(CandidatesConfig, overrides={"prompts": str(bad), "models": [str(tiny_model_dir)], "k": 2})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'messages\[0\]\.role'"):
        make_candidates(cfg)
    with pytest.raises(ConfigError, match="field 'k'"):
        make_candidates(cfg.model_copy(update={"k": 2, "models": ["a", "b", "c"]}))
    with pytest.raises(ConfigError, match="k"):
        load_config(CandidatesConfig, overrides=["--k", "1"])

    # The command: one line naming file, line and field, exit 1 (no model is loaded); a bad k: exit 2.
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    args = ["candidates", "--prompts", str(bad), "--model", str(tiny_model_dir), "-k", "2", "-o", str(tmp_path / "t.jsonl")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert f"{bad}:2: field 'messages[0].role'" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(app, [*args[:-3], "1"])
    assert r.exit_code == 2 and "field 'k'" in r.stderr
    assert not (tmp_path / "t.jsonl").exists()
