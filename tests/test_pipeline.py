"""`rlhfkit pipeline`: the wiring of the steps, the held-out data, and a whole tiny pipeline that is
killed (SIGKILL) during PPO and re-run: SFT and the reward model are not redone, PPO resumes from its
checkpoint, and the evaluation and the report are written at the end."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import ConfigError, PipelineConfig, load_config
from rlhfkit.pipeline import plan_pipeline, prepare_data, run_pipeline

from conftest import WORDS

REPO = Path(__file__).resolve().parents[1]


def write_data(tmp: Path) -> dict[str, Path]:
    """Tiny demonstrations, comparisons (the marker word wins) and prompts."""
    rng = random.Random(0)

    def sentence(lo=3, hi=8):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    paths = {k: tmp / f"{k}.jsonl" for k in ("demos", "comparisons", "prompts")}
    paths["demos"].write_text("".join(json.dumps({"prompt": f"{sentence()} {i}", "response": sentence()}) + "\n" for i in range(40)))
    paths["comparisons"].write_text(
        "".join(json.dumps({"prompt": f"{sentence()} {i}", "chosen": sentence() + " banana", "rejected": sentence()}) + "\n" for i in range(60))
    )
    paths["prompts"].write_text("".join(json.dumps({"prompt": f"{sentence()} {i}"}) + "\n" for i in range(50)))
    return paths


def tiny_pipeline_yaml(tmp: Path, model_dir: Path, ppo_steps: int = 12, judge: bool = True) -> Path:
    data = write_data(tmp)
    train = dict(precision="fp32", max_length=64, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, eval_every=0, checkpoint_every=2)
    cfg = {
        "output_dir": str(tmp / "run"),
        "model": str(model_dir),
        "heldout_prompt_fraction": 0.2,
        "sft": {**train, "data": str(data["demos"]), "max_steps": 4},
        "reward": {**train, "data": str(data["comparisons"]), "max_steps": 4, "eval_fraction": 0.2, "max_eval_comparisons": 16},
        "ppo": {
            "precision": "fp32", "prompts": str(data["prompts"]), "learning_rate": 1e-4,
            "generation": {"max_new_tokens": 12, "temperature": 1.0, "batch_size": 8},
            "prompts_per_iteration": 8, "minibatch_size": 4, "batch_size": 4, "ppo_epochs": 1,
            "max_steps": ppo_steps, "checkpoint_every": 2, "sample_every": 4,
        },
        "evaluate": {"max_prompts": 6, "batch_size": 8, "max_comparisons": 12, "best_of_n": [2]},
    }  # fmt: skip
    if judge:  # no data: half of the reward model's prompts go to the judge
        cfg["judge"] = {**train, "max_steps": 2, "eval_fraction": 0.2, "seed": 1}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- wiring


def test_plan_wires_the_steps_together(tmp_path):
    path = tiny_pipeline_yaml(tmp_path, Path("/models/base"))
    cfg = load_config(PipelineConfig, path)
    plan = plan_pipeline(cfg)
    run = tmp_path / "run"
    c = plan.configs
    assert plan.steps == ["sft", "reward", "judge", "ppo", "evaluate", "report"]
    assert c["sft"].output_dir == str(run / "sft") and c["sft"].model == "/models/base"
    assert c["reward"].model == str(run / "sft") and c["reward"].output_dir == str(run / "reward")
    assert c["judge"].model == "/models/base" and c["judge"].output_dir == str(run / "judge")
    assert c["ppo"].policy_model == str(run / "sft") and c["ppo"].reward_model == str(run / "reward")
    assert c["ppo"].prompts == str(run / "data" / "ppo_prompts.jsonl")
    ev = c["evaluate"]
    assert (ev.sft_model, ev.rlhf_model, ev.reward_model, ev.judge_reward_model) == (
        str(run / "sft"), str(run / "ppo"), str(run / "reward"), str(run / "judge"))  # fmt: skip
    assert ev.prompts == str(run / "data" / "eval_prompts.jsonl")
    assert ev.comparisons == str(run / "data" / "reward_heldout.jsonl")
    assert ev.generation.max_new_tokens == 12 and ev.generation.temperature == 1.0  # PPO's rollout settings
    assert plan.deps["ppo"] == ["sft", "reward"] and plan.deps["evaluate"] == ["sft", "ppo", "reward", "judge"]

    # reward.model: base / a name; evaluate.prompts given; heldout 0
    cfg2 = load_config(PipelineConfig, path, ["--reward.model", "base", "--ppo.reward_model", "judge", "--evaluate.prompts", "p.jsonl"])
    plan2 = plan_pipeline(cfg2)
    assert plan2.configs["reward"].model == "/models/base" and plan2.deps["reward"] == []
    assert plan2.configs["ppo"].reward_model == str(run / "judge")
    assert plan2.configs["ppo"].prompts == cfg.ppo.prompts and plan2.heldout_prompts is None
    assert plan_pipeline(load_config(PipelineConfig, path, ["--reward.model", "some/hub-model"])).configs["reward"].model == "some/hub-model"

    with pytest.raises(ConfigError, match="ppo.policy_model.*'judge' cannot be used here"):
        plan_pipeline(load_config(PipelineConfig, path, ["--ppo.policy_model", "judge"]))
    with pytest.raises(ConfigError, match="evaluate.judge_reward_model.*'judge' is not a step"):
        plan_pipeline(load_config(PipelineConfig, path, ["--judge", "null", "--evaluate.judge_reward_model", "judge"]))
    with pytest.raises(ConfigError, match="share a folder"):
        plan_pipeline(load_config(PipelineConfig, path, ["--ppo.output_dir", "sft"]))
    with pytest.raises(ConfigError, match="unknown step"):
        run_pipeline(cfg, ["sft", "rm"])


def test_held_out_data_and_saved_config_round_trip(tmp_path):
    from rlhfkit.data import load_comparisons, load_prompts, split_by_prompt

    cfg = load_config(PipelineConfig, tiny_pipeline_yaml(tmp_path, Path("/models/base")))
    plan = plan_pipeline(cfg)
    prepare_data(plan)
    run = tmp_path / "run"
    train, held = load_prompts(str(run / "data" / "ppo_prompts.jsonl")), load_prompts(str(run / "data" / "eval_prompts.jsonl"))
    assert len(train) + len(held) == 50 and held and not {json.dumps(p) for p in train} & {json.dumps(p) for p in held}
    # the reward model's held-out comparisons are exactly the ones the reward step holds out itself
    assert plan.configs["reward"].data == str(run / "data" / "reward_comparisons.jsonl")
    own = split_by_prompt(load_comparisons(plan.configs["reward"].data), cfg.reward.eval_fraction, seed=cfg.reward.seed)[1]
    assert load_comparisons(str(run / "data" / "reward_heldout.jsonl")) == own and len(own) >= 2
    mtime = (run / "data" / "eval_prompts.jsonl").stat().st_mtime_ns
    prepare_data(plan)  # unchanged files are not rewritten
    assert (run / "data" / "eval_prompts.jsonl").stat().st_mtime_ns == mtime

    from rlhfkit.pipeline import save_pipeline_config

    run.mkdir(exist_ok=True)
    save_pipeline_config(cfg, plan)
    again = plan_pipeline(load_config(PipelineConfig, run / "pipeline.yaml"))
    assert {k: v.model_dump() for k, v in again.configs.items()} == {k: v.model_dump() for k, v in plan.configs.items()}


def test_the_judge_trains_on_other_prompts_than_the_reward_model(tmp_path):
    """Without judge.data, reward.data is split by prompt: the reward model and the judge share no prompt (the
    opening user turn), together they have every comparison, and the held-out comparisons of the evaluation
    (which measure both) are in neither's training data."""
    from rlhfkit.data import load_comparisons, split_by_prompt

    cfg = load_config(PipelineConfig, tiny_pipeline_yaml(tmp_path, Path("/models/base")))
    plan = plan_pipeline(cfg)
    prepare_data(plan)
    data = tmp_path / "run" / "data"
    assert plan.configs["reward"].data == str(data / "reward_comparisons.jsonl")
    assert plan.configs["judge"].data == str(data / "judge_comparisons.jsonl")
    rm, judge = load_comparisons(plan.configs["reward"].data), load_comparisons(plan.configs["judge"].data)

    def opening(c):
        return next(m["content"] for m in c.messages if m["role"] == "user")

    assert not {opening(c) for c in rm} & {opening(c) for c in judge}
    assert 15 <= len(judge) <= 45 and len(rm) + len(judge) == 60  # judge_prompt_fraction 0.5 of the 60
    assert sorted(json.dumps(c.responses) for c in rm + judge) == sorted(json.dumps(c.responses) for c in load_comparisons(cfg.reward.data))
    rm_train, rm_held = split_by_prompt(rm, cfg.reward.eval_fraction, seed=cfg.reward.seed)  # what the reward step trains on
    judge_train, _ = split_by_prompt(judge, cfg.judge.eval_fraction, seed=cfg.judge.seed)
    held = {opening(c) for c in load_comparisons(plan.configs["evaluate"].comparisons)}
    assert held == {opening(c) for c in rm_held} and not held & {opening(c) for c in rm_train + judge_train}

    # a smaller share for the judge
    cfg3 = load_config(PipelineConfig, tmp_path / "pipeline.yaml", ["--judge_prompt_fraction", "0.2", "--output_dir", str(tmp_path / "r3")])
    plan3 = plan_pipeline(cfg3)
    prepare_data(plan3)
    assert len(load_comparisons(plan3.configs["judge"].data)) < len(judge)

    # given judge data must not share prompts with the reward model's
    same = load_config(PipelineConfig, tmp_path / "pipeline.yaml", ["--judge.data", cfg.reward.data])
    with pytest.raises(ConfigError, match=r"judge.data': 60 prompt\(s\) of the judge's comparisons are also in reward.data"):
        prepare_data(plan_pipeline(same))
    other = tmp_path / "other_comparisons.jsonl"
    other.write_text(json.dumps({"prompt": "a prompt of its own", "chosen": "yes", "rejected": "no"}) + "\n")
    plan4 = plan_pipeline(load_config(PipelineConfig, tmp_path / "pipeline.yaml", ["--judge.data", str(other)]))
    prepare_data(plan4)
    assert plan4.configs["judge"].data == str(other) and plan4.configs["reward"].data == cfg.reward.data


def test_a_missing_data_file_is_named_with_how_to_get_it(tmp_path):
    path = tiny_pipeline_yaml(tmp_path, Path("/models/base"))
    cfg = load_config(PipelineConfig, path, ["--reward.data", "[hh-rlhf:examples/data/hh-rlhf/nowhere.jsonl.gz]",
                                             "--evaluate.other_prompts", str(tmp_path / "missing_prompts.jsonl")])  # fmt: skip
    with pytest.raises(FileNotFoundError) as err:
        run_pipeline(cfg)
    text = str(err.value)
    assert "field 'reward.data': examples/data/hh-rlhf/nowhere.jsonl.gz" in text
    assert f"field 'evaluate.other_prompts': {tmp_path / 'missing_prompts.jsonl'}" in text
    assert "examples/data/README.md" in text and "--reward.data PATH" in text
    assert not (tmp_path / "run").exists()  # nothing started


def test_every_shipped_config_finds_its_data(monkeypatch):
    """From the project root of a fresh clone, as `make demo` runs: every data file a shipped config names exists
    (nothing outside the project, such as ../shared), and every pipeline has a judge and other-source prompts."""
    from rlhfkit.config import DPOConfig, RewardConfig, SFTConfig, PPOConfig
    from rlhfkit.data import load_comparisons, parse_spec
    from rlhfkit.pipeline import missing_data_files, shared_prompts

    monkeypatch.chdir(REPO)
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"demo.yaml", "hh.yaml", "gpu.yaml", "reward_hh.yaml"}
    for path in configs:
        assert "../" not in path.read_text(), f"{path.name} reads outside the project"
        data = yaml.safe_load(path.read_text())
        if "steps" in data:
            cfg = load_config(PipelineConfig, path)
            assert missing_data_files(cfg, plan_pipeline(cfg)) == [], path.name
            assert cfg.judge is not None and "judge" in cfg.steps and cfg.evaluate.other_prompts is not None, path.name
            assert cfg.evaluate.max_prompts >= 128, path.name
            if cfg.judge.data is not None:  # given judge data: other prompts than the reward model's
                assert not shared_prompts(load_comparisons(cfg.reward.data, score_range=None), load_comparisons(cfg.judge.data, score_range=None))
            continue
        cfg = load_config({"sft.yaml": SFTConfig, "ppo.yaml": PPOConfig, "dpo.yaml": DPOConfig}.get(path.name, RewardConfig), path)
        for field in ("data", "eval_data", "reference_data", "prompts"):
            value = getattr(cfg, field, None)
            for spec in value if isinstance(value, list) else [value] if value else []:
                assert Path(parse_spec(spec)[1]).exists(), f"{path.name}: {field}: {spec}"


def test_a_step_without_its_inputs_says_which_step_to_run(tmp_path, tiny_model_dir):
    cfg = load_config(PipelineConfig, tiny_pipeline_yaml(tmp_path, tiny_model_dir))
    with pytest.raises(FileNotFoundError, match="step 'ppo' needs the output of step 'sft'"):
        run_pipeline(cfg, ["ppo"])


def test_config_doc_and_cli_help():
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    result = CliRunner().invoke(app, ["config-doc", "pipeline"])
    assert result.exit_code == 0 and "heldout_prompt_fraction" in result.output and "  policy_model: sft" in result.output
    for cmd in ("pipeline", "evaluate", "report", "chat"):
        assert CliRunner().invoke(app, [cmd, "--help"]).exit_code == 0


# ----------------------------------------------------------------------------- the whole pipeline, killed and resumed


def _latest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(steps, default=0)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _pipeline(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(config)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def test_killed_pipeline_continues_where_it_stopped(tmp_path, tiny_model_dir):
    config = tiny_pipeline_yaml(tmp_path, tiny_model_dir, ppo_steps=14)
    run = tmp_path / "run"
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"

    proc = _pipeline(config, log1)
    deadline = time.monotonic() + 240
    try:
        while _latest_checkpoint(run / "ppo") < 2:
            assert proc.poll() is None, f"pipeline exited ({proc.returncode}) before PPO checkpointed:\n{log1.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no PPO checkpoint in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: like a power cut
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "ppo" / "final").exists(), "PPO finished before the kill: make the PPO step longer"
    killed_at = _latest_checkpoint(run / "ppo")
    assert 2 <= killed_at < 14
    before = {step: _snapshot(run / step) for step in ("sft", "reward", "judge")}
    metrics_before = {step: (run / step / "metrics.jsonl").read_text() for step in ("sft", "reward", "judge")}
    ppo_before = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert not (run / "eval" / "eval.json").exists()

    second = _pipeline(config, log2)
    assert second.wait(timeout=300) == 0, log2.read_text()[-4000:]
    out = log2.read_text()

    # SFT, the reward model and the judge were not redone
    for step in ("sft", "reward", "judge"):
        assert _snapshot(run / step) == before[step], f"{step} was redone"
        assert (run / step / "metrics.jsonl").read_text() == metrics_before[step]
    assert out.count("already done, skipped") == 3
    # PPO resumed from its checkpoint: the iterations up to it were not run again
    assert f"resumed from {run / 'ppo' / 'checkpoints'}" in out and f"(step {killed_at})" in out
    ppo_after = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ppo_after] == list(range(1, 15))
    assert [m for m in ppo_after if m["step"] <= killed_at] == [m for m in ppo_before if m["step"] <= killed_at]
    journal = [json.loads(l) for l in (run / "pipeline_log.jsonl").read_text().splitlines()]
    assert [(j["step"], j.get("resume")) for j in journal if j["event"] == "start"][-2:] == [("ppo", True), ("evaluate", False)]

    # the evaluation, its table and the report
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["n_prompts"] == 6 and ev["judge_reward_model"] and ev["reward_model_accuracy"]["pairs"] > 0
    assert 0 <= ev["win_rate"]["reward_model"]["rate"] <= 1 and 0 <= ev["win_rate"]["judge"]["rate"] <= 1
    assert ev["policies"]["sft"]["kl_from_sft"] == 0.0
    assert "SFT vs RLHF on 6 held-out prompts" in out and f"report: {run / 'report.html'}" in out
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 4  # sft, reward, judge, ppo

    # a third run has nothing left to do (the report is rewritten)
    third = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(config), "--steps", "sft,reward,ppo,evaluate"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stderr.count("already done, skipped") == 4 and "report:" not in third.stdout


def test_config_change_check_ignores_fields_added_since_a_run(tmp_path):
    """A finished step whose saved config.yaml predates a new field (with its default) is unchanged;
    a real difference is named."""
    import yaml

    from rlhfkit.config import PipelineConfig
    from rlhfkit.pipeline import _changed_fields, plan_pipeline

    plan = plan_pipeline(PipelineConfig(output_dir=str(tmp_path / "run")))
    saved = plan.configs["reward"].model_dump(mode="json")
    del saved["group_by_length"]  # as written by an rlhfkit that did not have the field yet
    plan.dirs["reward"].mkdir(parents=True)
    (plan.dirs["reward"] / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _changed_fields(plan, "reward") == []
    saved["learning_rate"] = saved["learning_rate"] * 2
    (plan.dirs["reward"] / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _changed_fields(plan, "reward") == ["learning_rate"]
