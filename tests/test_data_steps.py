"""Each step on TRL's formats gives what it gives on the same data in rlhfkit's own format: SFT on
prompt-completion (standard and conversational), the reward model on preference (explicit and implicit
prompt), PPO and evaluation (with a judge) on prompt-only. Short runs on the tiny model; the TRL data
also comes in the containers (parquet, arrow, save_to_disk) so the steps read those too."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import EvaluateConfig, GenerationSettings, PPOConfig, RewardConfig, SFTConfig
from rlhfkit.training import read_metrics

from conftest import WORDS
from test_ppo import reward_dir  # noqa: F401 (a fixture: the tiny reward model of PPO's tests)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sentences(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" {i}" for i in range(n)]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_run(a: Path, b: Path, folder: str = "final") -> None:
    """Same metrics (but time and speed) and the same weights."""
    def measured(key):  # speed, memory and clock time differ between any two runs
        return key.startswith(("time", "tokens_per_s", "memory/", "peak_memory"))

    def metrics(run):
        return [{k: v for k, v in m.items() if not measured(k)} for m in read_metrics(run / "metrics.jsonl")]

    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) and ma
    for x, y in zip(ma, mb):
        assert x == y, {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)}
    wa, wb = weights(a / folder), weights(b / folder)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- SFT: prompt-completion


@pytest.mark.parametrize("form", ["standard-jsonl", "conversational-parquet"])
def test_sft_on_prompt_completion_equals_own_format(tiny_model_dir, tmp_path, form):
    from rlhfkit.sft import run_sft

    prompts, responses = sentences(1, 24), sentences(2, 24)
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
    if form == "standard-jsonl":
        trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": p, "completion": r, "id": i} for i, (p, r) in enumerate(zip(prompts, responses))])
    else:
        rows = [{"prompt": [user(p)], "completion": [assistant(r)]} for p, r in zip(prompts, responses)]
        trl = str(tmp_path / "trl.parquet")
        datasets.Dataset.from_list(rows).to_parquet(trl)

    def run(data, name):
        cfg = SFTConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / name), batch_size=4, max_steps=2,
                        learning_rate=3e-3, eval_every=0, checkpoint_every=0, eval_fraction=0.2, precision="fp32", max_length=48)  # fmt: skip
        run_sft(cfg)
        return tmp_path / name

    a, b = run(own, "own"), run(trl, "trl")
    assert_same_run(a, b)
    assert read_metrics(a / "metrics.jsonl")[-1]["loss"] > 0


# ----------------------------------------------------------------------------- reward model: preference


@pytest.mark.parametrize("form", ["explicit-arrow", "implicit-save_to_disk"])
def test_reward_model_on_preference_equals_own_format(tiny_model_dir, tmp_path, form):
    from rlhfkit.reward import run_reward

    prompts, good, bad = sentences(3, 20), sentences(4, 20), sentences(5, 20)
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": p, "chosen": c, "rejected": r, "source": f"s{i % 2}"}
                                                for i, (p, c, r) in enumerate(zip(prompts, good, bad))])  # fmt: skip
    if form == "explicit-arrow":
        rows = [{"prompt": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)], "source": f"s{i % 2}"}
                for i, (p, c, r) in enumerate(zip(prompts, good, bad))]  # fmt: skip
        trl = str(tmp_path / "trl.arrow")
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(trl, table.schema) as writer:
            writer.write_table(table)
    else:
        rows = [{"chosen": [user(p), assistant(c)], "rejected": [user(p), assistant(r)], "source": f"s{i % 2}"}
                for i, (p, c, r) in enumerate(zip(prompts, good, bad))]  # fmt: skip
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "trl"))
        trl = str(tmp_path / "trl") + "@train"

    def run(data, name):
        cfg = RewardConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / name), precision="fp32", eval_fraction=0.2,
                           max_length=48, batch_size=4, learning_rate=2e-3, warmup_ratio=0.0, max_steps=2, eval_every=0, checkpoint_every=0)  # fmt: skip
        run_reward(cfg)
        return tmp_path / name

    a, b = run(own, "own"), run(trl, "trl")
    assert_same_run(a, b)
    assert any("accuracy" in m for m in read_metrics(a / "metrics.jsonl"))


# ----------------------------------------------------------------------------- PPO and evaluation: prompt-only


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[str, str]:
    """The same prompts in rlhfkit's own JSONL and as TRL conversational prompt-only rows in parquet."""
    root = tmp_path_factory.mktemp("prompts")
    prompts = sentences(6, 8)
    own = write_jsonl(root / "own.jsonl", prompts)
    trl = str(root / "trl.parquet")
    datasets.Dataset.from_list([{"prompt": [user(p)], "id": i} for i, p in enumerate(prompts)]).to_parquet(trl)
    return own, trl


def test_ppo_on_prompt_only_equals_own_format(tiny_model_dir, reward_dir, prompt_files, tmp_path):
    from rlhfkit.rl import run_ppo

    def run(prompts, name):
        cfg = PPOConfig(policy_model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=prompts, output_dir=str(tmp_path / name),
                        precision="fp32", prompts_per_iteration=4, minibatch_size=4, batch_size=4, ppo_epochs=1, max_steps=1,
                        learning_rate=1e-3, generation={"max_new_tokens": 6, "temperature": 1.0, "batch_size": 4}, checkpoint_every=0,
                        sample_every=0)  # fmt: skip
        run_ppo(cfg)
        return tmp_path / name

    a, b = run(prompt_files[0], "own"), run(prompt_files[1], "trl")
    assert_same_run(a, b)
    assert "score" in read_metrics(a / "metrics.jsonl")[-1]


def test_evaluation_and_judge_on_prompt_only_equal_own_format(tiny_model_dir, reward_dir, prompt_files, tmp_path):
    from rlhfkit.evaluate import evaluate_policies

    def run(prompts):
        cfg = EvaluateConfig(output_dir=str(tmp_path / "eval"), sft_model=str(tiny_model_dir), rlhf_model=str(tiny_model_dir),
                             reward_model=str(reward_dir), judge_reward_model=str(reward_dir), prompts=prompts, max_prompts=4,
                             batch_size=4, precision="fp32", generation=GenerationSettings(max_new_tokens=6, batch_size=4))  # fmt: skip
        metrics, records = evaluate_policies(cfg, progress=False)
        assert metrics.pop("prompts") == prompts
        metrics.pop("seconds")  # clock time
        return metrics, records

    own, trl = run(prompt_files[0]), run(prompt_files[1])
    assert own[0].keys() == trl[0].keys()
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN (no informative prompt) equals NaN
    assert {k: v for k, v in own[0].items() if not same(v, trl[0][k])} == {}
    assert same(own[1], trl[1])
    heldout = own[1]["heldout"]
    assert len(heldout) == 4 and "judge_score" in heldout[0]["sft"]
