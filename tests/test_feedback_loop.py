"""The human-feedback loop, end to end through the real commands:

    rlhfkit candidates (2 tiny models) -> rlhfkit label serve (a real server on a free loopback port,
    driven over its JSON API by a scripted annotator) -> rlhfkit label export -> rlhfkit reward

The annotator prefers responses containing MARK, then shorter ones (equal keys are tied) and
skips the first task it is given. The export must hold one ranking per labelled task in exactly
that order, and the reward step must train on exactly those comparisons and save a loadable model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest

from browser_utils import REPO, LabelServer, http_client
from conftest import WORDS, build_tiny_model
from rlhfkit.data import Comparison
from rlhfkit.labelling.tasks import load_tasks

MARK = "he"  # a substring the tiny models' random output contains now and then


def rlhfkit(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"rlhfkit {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


class CliLabelServer(LabelServer):
    """The label server started as `rlhfkit label serve` (the top-level command)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "rlhfkit.cli", "label", *super().command()[3:]]


def scripted_ranking(texts: list[str]) -> list[list[int]]:
    """Tie groups of indices, best first: containing MARK beats not, then shorter beats longer."""
    key = lambda i: (MARK not in texts[i], len(texts[i]))  # noqa: E731
    return [sorted(g) for _, g in groupby(sorted(range(len(texts)), key=key), key=key)]


@pytest.fixture(scope="module")
def second_model(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama-seed1")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_model(out, vocab_size=vocab, seed=1)
    return out


def test_candidates_label_export_reward(tmp_path, tiny_model_dir, second_model):
    # 1. candidates: 6 prompts, k=4 from two models (2 each)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{WORDS[5 * i]} {WORDS[5 * i + 1]} {i}?"}) + "\n" for i in range(6)))
    tasks_path = tmp_path / "tasks.jsonl"
    models = [str(tiny_model_dir), str(second_model)]
    rlhfkit(
        "candidates", "--prompts", str(prompts), "--model", models[0], "--model", models[1], "-k", "4",
        "--output", str(tasks_path), "--precision", "fp32", "--generation.max_new_tokens", "12", "--generation.temperature", "1.0",
    )  # fmt: skip
    tasks = {t.id: t for t in load_tasks(tasks_path)}
    assert len(tasks) == 6 and all(t.k == 4 and t.models == [models[0], models[1]] * 2 for t in tasks.values())

    # 2. label serve + a scripted annotator over the JSON API
    db = tmp_path / "labels.db"
    out = rlhfkit("label", "add-annotator", "alice", "--db", str(db)).stdout
    token = next(line.split()[1] for line in out.splitlines() if line.startswith("token: "))
    expected: dict[str, list[list[int]]] = {}  # task id -> ranking in original indices
    skipped = None
    with CliLabelServer(db, tasks_path, log=tmp_path / "server.log") as server, http_client(server.url, token) as c:
        while True:
            r = c.post("/api/next")
            assert r.status_code == 200, r.text
            view = r.json()["task"]
            if view is None:
                break
            if skipped is None:
                skipped = view["id"]
                assert c.post(f"/api/tasks/{skipped}/skip").status_code == 200
                continue
            shown = [resp["text"] for resp in view["responses"]]  # display order
            display_ranking = scripted_ranking(shown)
            r = c.post(f"/api/tasks/{view['id']}/submit", json={"ranking": display_ranking})
            assert r.status_code == 201, r.text
            original = tasks[view["id"]].responses
            expected[view["id"]] = [sorted(original.index(shown[d]) for d in g) for g in display_ranking]
    assert skipped is not None and len(expected) == 5
    assert any(len(g) > 1 for g in expected.values())  # K-wise, not just pairs

    # 3. export: one ranking per labelled task, in the scripted order (original indices)
    export = tmp_path / "export.jsonl"
    rlhfkit("label", "export", "--db", str(db), "--out", str(export))
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert sorted(rec["task_id"] for rec in records) == sorted(expected)
    for rec in records:
        task = tasks[rec["task_id"]]
        assert rec["annotator"] == "alice" and rec["responses"] == task.responses and rec["models"] == task.models
        assert [sorted(g) for g in rec["ranking"]] == expected[rec["task_id"]] == scripted_ranking(task.responses)

    # 4. reward: trains on exactly those comparisons and saves a loadable reward model
    run = tmp_path / "reward"
    r = rlhfkit(
        "reward", "--model", str(tiny_model_dir), "--data", str(export), "--output_dir", str(run), "--eval_fraction", "0",
        "--max_steps", "3", "--batch_size", "2", "--precision", "fp32", "--max_length", "64", "--learning_rate", "1e-3",
    )  # fmt: skip
    comparisons = [Comparison([{"role": "user", "content": tasks[t].prompt}], tasks[t].responses, rk) for t, rk in expected.items()]
    n_pairs = sum(len(c.pairs()) for c in comparisons)
    n_cmp = sum(1 for c in comparisons if c.pairs())
    assert f"{export}: read 5 comparisons" in r.stderr
    assert f"reward data: {n_cmp} train comparisons ({n_pairs} pairs" in r.stderr
    from rlhfkit.reward import load_reward_model, score

    rm, tokenizer, stats = load_reward_model(run)
    assert (stats["train_comparisons"], stats["train_pairs"], stats["steps"]) == (n_cmp, n_pairs, 3)
    train = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m.get("phase") == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    task = tasks[records[0]["task_id"]]
    scores = score(rm, tokenizer, [task.messages] * task.k, task.responses, 4)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
