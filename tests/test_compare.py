"""Several step-3 methods from one SFT and one reward model (`methods:` in the pipeline), compared by the evaluation
and the report on the same held-out prompts under the same judge. With tiny models: PPO and DPO run end to end (RLOO
and GRPO share PPO's path: `tests/test_rloo_grpo.py`); the plans of all four are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import ConfigError, PipelineConfig, load_config
from rlhfkit.pipeline import plan_pipeline, run_pipeline, step_costs

from test_pipeline import tiny_pipeline_yaml

METHODS = [{"algorithm": "ppo"}, {"algorithm": "dpo", "overrides": {"max_steps": 3, "beta": 0.5}}]


def compare_yaml(tmp: Path, model_dir: Path) -> Path:
    path = tiny_pipeline_yaml(tmp, model_dir, ppo_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["dpo"] = {"precision": "fp32", "max_length": 64, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 0, "checkpoint_every": 2}
    cfg["methods"] = METHODS
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_plan_runs_every_method_from_the_same_sft_and_reward_model(tmp_path):
    cfg = load_config(PipelineConfig, compare_yaml(tmp_path, Path("/models/base")))
    plan = plan_pipeline(cfg)
    run, c = tmp_path / "run", plan.configs
    assert plan.steps == ["sft", "reward", "judge", "ppo", "dpo", "evaluate", "report"]
    assert plan.methods == {"ppo": "ppo", "dpo": "dpo"}
    assert c["ppo"].policy_model == str(run / "sft") and c["ppo"].reward_model == str(run / "reward")
    dpo = c["dpo"]
    assert dpo.model == str(run / "sft") and dpo.output_dir == str(run / "dpo") and (dpo.max_steps, dpo.beta) == (3, 0.5)
    # DPO trains on the reward model's comparisons (the judge's prompts split off) and holds out what the reward step holds out
    assert dpo.data == c["reward"].data == str(run / "data" / "reward_comparisons.jsonl")
    assert (dpo.eval_fraction, dpo.seed, dpo.eval_data) == (c["reward"].eval_fraction, c["reward"].seed, c["reward"].eval_data)
    assert dpo.max_eval_comparisons == c["evaluate"].max_comparisons == 12  # the comparisons the reward model's accuracy uses
    ev = c["evaluate"]
    assert ev.methods == {"ppo": str(run / "ppo"), "dpo": str(run / "dpo")} and ev.rlhf_model == str(run / "ppo")
    assert set(plan.deps["evaluate"]) >= {"sft", "reward", "judge", "ppo", "dpo"} and plan.deps["dpo"] == ["sft"]
    # only some methods, by name
    named = plan_pipeline(cfg.model_copy(update={"steps": ["sft", "dpo"]}))
    assert named.steps == ["sft", "dpo"]

    with pytest.raises(ConfigError, match="distinct"):
        plan_pipeline(load_config(PipelineConfig, compare_yaml(tmp_path, Path("/m")), ["--methods", "[{algorithm: dpo}, {algorithm: dpo}]"]))
    with pytest.raises(ConfigError, match="distinct"):
        plan_pipeline(load_config(PipelineConfig, compare_yaml(tmp_path, Path("/m")), ["--methods", "[{name: judge}]"]))
    with pytest.raises(ConfigError, match="method 'dpo'.*beta"):
        plan_pipeline(load_config(PipelineConfig, compare_yaml(tmp_path, Path("/m")), ["--methods", "[{algorithm: dpo, overrides: {beta: -1}}]"]))
    rloo = load_config(PipelineConfig, compare_yaml(tmp_path, Path("/m")), ["--methods", "[{algorithm: rloo}]"])
    assert plan_pipeline(rloo).configs["rloo"].algorithm == "rloo"


def test_compare_ppo_and_dpo_on_the_same_prompts_under_the_same_judge(tmp_path, tiny_model_dir):
    from rlhfkit.data import load_comparisons
    from rlhfkit.eval_tables import methods_table

    cfg = load_config(PipelineConfig, compare_yaml(tmp_path, tiny_model_dir))
    run_pipeline(cfg)
    run = tmp_path / "run"
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert list(ev["methods"]) == ["ppo", "dpo"]
    for name, block in ev["methods"].items():
        assert block["model"] == str(run / name / "final")
        w = block["win_rate"]["judge"]  # the same prompts, under the same judge
        assert block["n_prompts"] == ev["n_prompts"] and w["wins"] + w["ties"] + w["losses"] == ev["n_prompts"]
        assert block["policies"]["sft"] == ev["policies"]["sft"]  # ... against the same SFT responses
        assert block["policies"]["rlhf"]["kl_from_sft"] != 0  # a trained policy (a Monte Carlo estimate: 6 prompts can make it negative)
    assert ev["methods"]["ppo"]["win_rate"] == ev["win_rate"]  # the top level is the first method, as before
    # DPO's implicit-reward accuracy, on the reward model's held-out comparisons
    held = load_comparisons(str(run / "data" / "reward_heldout.jsonl"), score_range=None)
    assert ev["methods"]["ppo"]["policy_accuracy"] is None
    assert ev["methods"]["dpo"]["policy_accuracy"]["comparisons"] == len(held)
    records = [json.loads(line) for line in (run / "eval" / "eval_samples.jsonl").read_text().splitlines()]
    assert {"sft", "ppo", "dpo"} <= set(records[0])

    costs = step_costs(run)
    assert costs["ppo"]["seconds"] > 0 and costs["dpo"]["peak_memory_mb"] > 0
    header, rows = methods_table(ev, costs)
    assert header[1:] == ["ppo", "dpo"]
    table = {r[0]: dict(zip(header[1:], r[1:])) for r in rows}
    assert "judge score gain over SFT (paired)" in table
    assert "implicit reward" in table["held-out pairwise accuracy"]["dpo"] and "reward model" in table["held-out pairwise accuracy"]["ppo"]
    assert table["training time"]["dpo"].endswith(" s") and table["peak memory of the step (RSS; GPU: allocated)"]["ppo"].endswith("GB")
    html = (run / "report.html").read_text()
    assert "Step-3 methods against the same SFT responses" in html and "DPO" in html and html.count("<details><summary><b>") == 2


def test_the_compare_config_runs_ppo_rloo_grpo_and_dpo_on_the_bundled_data(monkeypatch):
    from rlhfkit.pipeline import missing_data_files

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(PipelineConfig, "configs/compare.yaml")
    assert [m.algorithm for m in cfg.methods] == ["ppo", "rloo", "grpo", "dpo"] and cfg.model == "default"
    assert cfg.judge is not None and cfg.evaluate.other_prompts is not None and cfg.evaluate.max_prompts >= 128
    assert cfg.dpo.data is None  # DPO trains on the reward model's comparisons, held out like them
    plan = plan_pipeline(cfg)
    assert missing_data_files(cfg, plan) == []
    assert plan.configs["dpo"].data == plan.configs["reward"].data and plan.configs["dpo"].model.endswith("sft")
