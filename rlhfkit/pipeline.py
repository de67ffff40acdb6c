"""`rlhfkit pipeline`: SFT -> reward model (-> judge) -> PPO -> evaluation -> report, in one run folder.

    runs/demo/
        pipeline.yaml        the pipeline config as run (sections with keywords, re-loadable)
        pipeline_log.jsonl   one line per step start / finish / skip, with seconds
        data/                held-out splits made by the pipeline (see below)
        sft/ reward/ [judge/] ppo/    the step run folders (config.yaml, metrics.jsonl, checkpoints/, final/)
        eval/                eval.json, eval_samples.jsonl
        report.html          `rlhfkit report runs/demo`

Wiring: every model field of a section may name a pipeline keyword - 'base' (the pipeline's `model`),
'sft', 'reward', 'judge', 'ppo' (that step's run folder; a run folder stands for its final/ model).
Defaults: SFT starts from base; the reward model from sft; PPO's policy from sft and its reward model
(and critic) from reward; the evaluation compares sft with ppo under reward (and judge).

The judge: a `judge:` section trains a second reward model that PPO never sees, for the evaluation. Unless
judge.data is given, reward.data is split by prompt (the opening user turn, `judge_prompt_fraction` of the prompts
to the judge, seeded) into data/reward_comparisons.jsonl (what the reward model trains on) and
data/judge_comparisons.jsonl; given judge.data must share no prompt with reward.data (checked).

Held-out data: unless `evaluate.prompts` is given, `heldout_prompt_fraction` of ppo.prompts (split by
prompt, seeded) are written to data/eval_prompts.jsonl and PPO trains on the rest (data/ppo_prompts.jsonl).
Unless `evaluate.comparisons` is given, the evaluation measures the reward model's accuracy on
reward.eval_data or else on the very comparisons the reward step holds out itself (the same
`split_by_prompt(reward.data, reward.eval_fraction, reward.seed)`, a pure function of prompt and seed),
written to data/reward_heldout.jsonl.

Re-running: a step whose output is complete is skipped (the steps check this themselves, the pipeline
logs it); a step killed half-way resumes from its last checkpoint. The pipeline warns when a finished
step's saved config differs from the current one, or when it is older than a step it depends on (its
inputs changed): delete that step's folder to redo it.

Before anything runs, every data file the config names is checked: a missing one is named with its field and
where to get it (the bundled data is in examples/data/, described in examples/data/README.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pydantic import ValidationError

from .config import (
    ConfigError,
    DPOConfig,
    EvaluateConfig,
    GenerationSettings,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    save_config,
)
from .pipeline_data import check_data_files, missing_data_files, prepare_data, shared_prompts
from .training import RunDir

log = logging.getLogger("rlhfkit.pipeline")

ORDER = ("sft", "reward", "judge", "ppo", "evaluate", "report")
JUDGE_SPLIT_SEED = 1_000_003  # added to reward.seed for the reward model / judge split
TRAINING_STEPS = ("sft", "reward", "judge", "ppo")
KEYWORDS = ("base", "sft", "reward", "judge", "ppo")
TITLES = {
    "sft": "supervised fine-tuning",
    "reward": "reward model",
    "judge": "judge reward model",
    "ppo": "PPO",
    "evaluate": "evaluation",
    "report": "report",
}


@dataclass
class Split:
    """`split_by_prompt(load(spec), fraction, seed)`, written to train_file (if any) and heldout_file."""

    spec: Any
    fraction: float
    seed: int
    heldout_file: Path
    train_file: Path | None = None
    score_range: Any = None  # comparisons only


@dataclass
class Plan:
    """The resolved pipeline: one plain step config per step (paths filled in), and the data files to write."""

    run: Path
    configs: dict[str, Any]  # step name -> SFTConfig / RewardConfig / PPOConfig / EvaluateConfig
    dirs: dict[str, Path]  # step name -> its folder
    deps: dict[str, list[str]]  # step name -> pipeline steps whose output it reads
    heldout_prompts: Split | None = None  # ppo.prompts -> PPO's prompts + the evaluation's
    heldout_comparisons: Split | None = None  # reward.data -> (the reward step's own split) its held-out part
    judge_comparisons: Split | None = None  # reward.data -> the reward model's part (train_file) + the judge's
    judge_data_check: tuple[Any, Any] | None = None  # (reward.data, judge.data) that must share no prompt
    steps: list[str] = field(default_factory=list)  # the steps to run, in order
    methods: dict[str, str] = field(default_factory=dict)  # step-3 step name -> its algorithm (ppo, rloo, grpo, dpo)


def plan_pipeline(cfg: PipelineConfig) -> Plan:
    """Resolve keywords and folders into plain step configs (nothing is read or written)."""
    run = Path(cfg.output_dir)
    sections = {name: getattr(cfg, name) for name in ("sft", "reward", "judge", "ppo", "evaluate")}
    sections = {k: v for k, v in sections.items() if v is not None and not (k == "ppo" and cfg.methods)}
    dirs = {name: run / section.output_dir for name, section in sections.items()}
    methods = {m.label: m for m in cfg.methods}
    reserved = [s for s in (*ORDER, "data") if s != "ppo"]
    if len(methods) != len(cfg.methods) or set(methods) & set(reserved):
        raise ConfigError(f"pipeline: field 'methods': the names {[m.label for m in cfg.methods]} must be distinct and none of "
                          f"{', '.join(reserved)} (a method's name is its folder and its step)")  # fmt: skip
    dirs.update({label: run / label for label in methods})
    if len(set(dirs.values())) != len(dirs):
        raise ConfigError(f"pipeline: two steps share a folder: {', '.join(f'{k}={v}' for k, v in dirs.items())}")
    deps: dict[str, list[str]] = {name: [] for name in dirs}

    def ref(step: str, field_name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
        if value is None:
            return None
        if value == "base":
            return cfg.model
        if value in KEYWORDS:
            if value not in allowed or value not in sections:
                what = f"'{value}' is not a step of this pipeline" if value not in sections else f"'{value}' cannot be used here"
                raise ConfigError(f"pipeline: field '{step}.{field_name}': {what} (use one of {', '.join(a for a in allowed if a in sections)}, 'base' or a model)")
            deps[step].append(value)
            return str(dirs[value])
        return value

    def plain(cls, section, **updates):
        data = section.model_dump()
        data.update(updates)
        return cls.model_validate(data)

    configs: dict[str, Any] = {}
    configs["sft"] = plain(SFTConfig, cfg.sft, output_dir=str(dirs["sft"]), model=ref("sft", "model", cfg.sft.model, ()))
    reward_data, judge_data, judge_split, judge_check = cfg.reward.data, None, None, None
    if cfg.judge is not None:
        judge_data = cfg.judge.data
        if judge_data is None:  # a split by prompt of the reward model's data: the two never see the same prompt
            reward_file, judge_file = run / "data" / "reward_comparisons.jsonl", run / "data" / "judge_comparisons.jsonl"
            # Another seed than reward.seed, which the reward step's own held-out split hashes with: with the same
            # hash the reward model's part would hold no prompt below its eval_fraction.
            judge_split = Split(cfg.reward.data, cfg.judge_prompt_fraction, cfg.reward.seed + JUDGE_SPLIT_SEED, judge_file,
                                reward_file, score_range=cfg.reward.score_range)  # fmt: skip
            reward_data, judge_data = str(reward_file), str(judge_file)
        else:
            judge_check = (cfg.reward.data, judge_data)
    configs["reward"] = plain(
        RewardConfig, cfg.reward, output_dir=str(dirs["reward"]), model=ref("reward", "model", cfg.reward.model, ("sft",)), data=reward_data
    )
    if cfg.judge is not None:
        configs["judge"] = plain(
            RewardConfig, cfg.judge, output_dir=str(dirs["judge"]), model=ref("judge", "model", cfg.judge.model, ("sft",)), data=judge_data
        )

    heldout_prompts = None
    ppo_prompts = cfg.ppo.prompts
    eval_prompts = cfg.evaluate.prompts
    if eval_prompts is None:
        if cfg.heldout_prompt_fraction > 0:
            train_file, eval_file = run / "data" / "ppo_prompts.jsonl", run / "data" / "eval_prompts.jsonl"
            heldout_prompts = Split(cfg.ppo.prompts, cfg.heldout_prompt_fraction, cfg.ppo.seed, eval_file, train_file)
            ppo_prompts, eval_prompts = str(train_file), str(eval_file)
        else:
            eval_prompts = cfg.ppo.prompts
    if not methods:
        configs["ppo"] = plain(
            PPOConfig,
            cfg.ppo,
            output_dir=str(dirs["ppo"]),
            policy_model=ref("ppo", "policy_model", cfg.ppo.policy_model, ("sft",)),
            reward_model=ref("ppo", "reward_model", cfg.ppo.reward_model, ("reward", "judge")),
            prompts=ppo_prompts,
        )
    for label, method in methods.items():
        configs[label] = _method_config(cfg, method, str(dirs[label]), ref, ppo_prompts, reward_data)

    ev = cfg.evaluate
    heldout_comparisons = None
    comparisons = ev.comparisons
    if comparisons is None:
        if cfg.reward.eval_data is not None:
            comparisons = cfg.reward.eval_data
        elif cfg.reward.eval_fraction > 0:
            file = run / "data" / "reward_heldout.jsonl"
            heldout_comparisons = Split(reward_data, cfg.reward.eval_fraction, cfg.reward.seed, file, score_range=cfg.reward.score_range)
            comparisons = str(file)
    judge = ev.judge_reward_model
    if judge is None and cfg.judge is not None:
        judge = "judge"
    generation = ev.generation
    if generation is None:
        generation = GenerationSettings.model_validate(cfg.ppo.generation.model_dump())
    compared = {}  # with methods: every method, by name, the first as rlhf_model
    if methods:
        compared = {label: str(dirs[label]) for label in methods}
        deps["evaluate"] += list(methods)
    configs["evaluate"] = plain(
        EvaluateConfig,
        ev,
        output_dir=str(dirs["evaluate"]),
        sft_model=ref("evaluate", "sft_model", ev.sft_model, ("sft",)),
        rlhf_model=next(iter(compared.values())) if compared else ref("evaluate", "rlhf_model", ev.rlhf_model, ("sft", "ppo")),
        methods=compared or ev.methods,
        reward_model=ref("evaluate", "reward_model", ev.reward_model, ("reward", "judge")),
        judge_reward_model=ref("evaluate", "judge_reward_model", judge, ("reward", "judge")),
        prompts=eval_prompts,
        comparisons=comparisons,
        generation=generation.model_dump(),
    )
    step3 = {label: m.algorithm for label, m in methods.items()} or {"ppo": "ppo"}
    steps = []
    for s in ORDER:
        if s == "ppo":  # the step-3 methods: all of them, or those named in steps
            steps += [label for label in step3 if "ppo" in cfg.steps or label in cfg.steps]
        elif s in cfg.steps and (s == "report" or s in configs):
            steps.append(s)
    return Plan(run, configs, dirs, deps, heldout_prompts, heldout_comparisons, judge_split, judge_check, steps, step3)


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"generation.batch_size": 8} -> {"generation": {"batch_size": 8}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _method_config(cfg: PipelineConfig, method, output_dir: str, ref, ppo_prompts, reward_data):
    """One step-3 method's plain config: its section (`ppo` or `dpo`), its overrides, the pipeline's wiring."""
    from .config import merge_dicts

    label = method.label
    if method.algorithm == "dpo":
        cls, data = DPOConfig, cfg.dpo.model_dump()
        if data["data"] is None:  # the reward model's comparisons and held-out split (see PipelineDPOConfig.data)
            r = cfg.reward
            data.update(data=reward_data, eval_data=r.eval_data, eval_fraction=r.eval_fraction, seed=r.seed, score_range=r.score_range)
            if cfg.evaluate.max_comparisons and "max_eval_comparisons" not in cfg.dpo.model_fields_set:
                data["max_eval_comparisons"] = cfg.evaluate.max_comparisons  # the comparisons the reward model is measured on
    else:
        cls, data = PPOConfig, cfg.ppo.model_dump()
        if data["prompts"] == cfg.ppo.prompts:
            data["prompts"] = ppo_prompts  # without the evaluation's held-out prompts
        if method.algorithm != "ppo":
            data["algorithm"] = method.algorithm
    data = merge_dicts(data, _nested(method.overrides))
    data["output_dir"] = output_dir
    if method.algorithm == "dpo":
        data["model"] = ref(label, "model", data["model"], ("sft",))
    else:
        data["policy_model"] = ref(label, "policy_model", data["policy_model"], ("sft",))
        data["reward_model"] = ref(label, "reward_model", data["reward_model"], ("reward", "judge"))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"pipeline: field 'methods': method '{label}' ({method.algorithm}): {errors}") from None


# ----------------------------------------------------------------------------- running


def _step_done(plan: Plan, name: str) -> bool:
    if name == "evaluate":
        return (plan.dirs["evaluate"] / "eval.json").exists()
    return RunDir(plan.dirs[name]).is_done()


def _done_time(plan: Plan, name: str) -> float | None:
    if not _step_done(plan, name):
        return None
    if name == "evaluate":
        return (plan.dirs["evaluate"] / "eval.json").stat().st_mtime
    final = RunDir(plan.dirs[name]).final
    files = [p for p in (final / "config.json", final / "adapter_config.json") if p.exists()]
    return max(p.stat().st_mtime for p in files)


def _config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _changed_fields(plan: Plan, name: str) -> list[str]:
    """Fields in which the config a step already ran with (its saved config.yaml) differs from the current one."""
    saved_file = plan.dirs[name] / "config.yaml"
    if not saved_file.exists():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = plan.configs[name]
    try:  # a field added to rlhfkit since that run counts as its default, not as a change
        saved = type(current).model_validate(saved).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a field since removed or renamed: compare as written
        pass
    return [c for c in _config_changes(saved, current.model_dump(mode="json")) if c != "resume"]


def _warn_if_changed(plan: Plan, name: str, changed: list[str], done: bool) -> None:
    """A training step that already ran (fully or partly) with another config keeps its earlier run: say so."""
    if changed:
        log.warning(
            "step '%s' %s with another config (differs in: %s); %s. Delete %s to redo it with the current config.",
            name, "was made" if done else "was started", ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""),
            "keeping it" if done else "resuming it anyway", plan.dirs[name],
        )  # fmt: skip


def _stale_deps(plan: Plan, name: str) -> list[str]:
    """Steps this finished step was built from that finished after it (so it was made from an older version)."""
    mine = _done_time(plan, name)
    if mine is None:
        return []
    return [dep for dep in plan.deps.get(name, []) if (_done_time(plan, dep) or 0) > mine]


def _check_inputs(plan: Plan, name: str) -> None:
    for dep in plan.deps.get(name, []):
        if not _step_done(plan, dep):
            raise FileNotFoundError(
                f"step '{name}' needs the output of step '{dep}' ({plan.dirs[dep] / 'final'}), which is missing: "
                f"run the pipeline with '{dep}' in its steps"
            )


def _runner(plan: Plan, name: str) -> Callable[[Any], Any]:
    if plan.methods.get(name) == "dpo":
        from .rl.dpo import run_dpo

        return run_dpo
    if name in plan.methods:
        from .rl import run_ppo  # PPO, RLOO or GRPO, as the method's `algorithm` says

        return run_ppo
    if name == "sft":
        from .sft import run_sft

        return run_sft
    if name in ("reward", "judge"):
        from .reward import run_reward

        return run_reward
    if name == "evaluate":
        from .evaluate import run_evaluate

        return lambda cfg: run_evaluate(cfg, print_table=False)  # `rlhfkit pipeline` prints it at the very end
    raise ValueError(name)


def reset_peak_memory() -> None:
    """Start measuring a step's own peak memory: the GPU's peak counter, or the process's peak resident set (Linux
    resets it through /proc/self/clear_refs); otherwise the peak is the process's since it started (earlier steps
    included)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_since_reset() -> float:
    """MB: the GPU memory allocated at most, or the peak resident set (VmHWM) since `reset_peak_memory`."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        from .training import peak_memory_mb

        return peak_memory_mb()


def step_costs(run: Path) -> dict[str, dict[str, float]]:
    """Per step of a pipeline run folder: the seconds it ran (summed over re-runs) and its peak memory in MB (the
    highest of its runs), from pipeline_log.jsonl."""
    out: dict[str, dict[str, float]] = {}
    path = Path(run) / "pipeline_log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") != "done" or not isinstance(r.get("seconds"), (int, float)):
            continue
        cost = out.setdefault(r["step"], {"seconds": 0.0, "peak_memory_mb": None})
        cost["seconds"] += r["seconds"]
        if isinstance(r.get("peak_memory_mb"), (int, float)):
            cost["peak_memory_mb"] = max(cost["peak_memory_mb"] or 0.0, r["peak_memory_mb"])
    return out


class _StepLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


def save_pipeline_config(cfg: PipelineConfig, plan: Plan) -> None:
    """The pipeline config as run (re-loadable with `--config`), and the resolved step configs beside it."""
    save_config(cfg, plan.run / "pipeline.yaml")
    resolved = {name: c.model_dump(mode="json") for name, c in plan.configs.items()}
    (plan.run / "pipeline.resolved.yaml").write_text(
        "# The step configs the pipeline derived from pipeline.yaml (for reading; each step also saves its own config.yaml).\n"
        + yaml.safe_dump(resolved, sort_keys=False)
    )


def run_pipeline(cfg: PipelineConfig, steps: list[str] | None = None) -> Plan:
    """Run (or continue) the pipeline; returns the plan. `steps` overrides cfg.steps."""
    given = cfg
    if steps is not None:
        unknown = [s for s in steps if s not in ORDER and s not in {m.label for m in cfg.methods}]
        if unknown:
            raise ConfigError(f"pipeline: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(ORDER)}")
        cfg = cfg.model_copy(update={"steps": steps})
    plan = plan_pipeline(cfg)
    check_data_files(cfg, plan)
    plan.run.mkdir(parents=True, exist_ok=True)
    save_pipeline_config(given, plan)  # the whole pipeline, not just the steps of this call
    prepare_data(plan)
    journal = _StepLog(plan.run / "pipeline_log.jsonl")
    todo = [s for s in plan.steps if s != "report"]
    log.info("pipeline %s: steps %s", plan.run, " -> ".join(plan.steps))
    for i, name in enumerate(todo, 1):
        title = f"{name} ({plan.methods[name]})" if name in plan.methods and name != plan.methods[name] else TITLES.get(name, name)
        header = f"step {i}/{len(todo)}: {title} ({plan.dirs[name]})"
        done = _step_done(plan, name)
        changed = _changed_fields(plan, name)
        stale = _stale_deps(plan, name) if done else []
        if name == "evaluate" and done and (stale or changed):  # derived and fairly cheap: redo it
            why = f"{' and '.join(stale)} changed" if stale else f"its settings changed ({', '.join(changed[:8])})"
            log.info("%s: %s since the last evaluation; evaluating again", header, why)
            done = False
        elif name != "evaluate":
            _warn_if_changed(plan, name, changed, done)
        if done and stale and name != "evaluate":
            log.warning(
                "step '%s' is older than %s, which it was built from: it was made from an earlier version. "
                "Delete %s to redo it.", name, " and ".join(f"step '{d}'" for d in stale), plan.dirs[name],
            )  # fmt: skip
        if done:
            log.info("%s: already done, skipped", header)
            journal.write(step=name, event="skipped")
            continue
        _check_inputs(plan, name)
        resuming = (name in TRAINING_STEPS or name in plan.methods) and RunDir(plan.dirs[name]).latest_checkpoint() is not None
        log.info("%s: %s", header, "resuming from its last checkpoint" if resuming else "starting")
        journal.write(step=name, event="start", resume=resuming)
        t0 = time.time()
        reset_peak_memory()
        _runner(plan, name)(plan.configs[name])
        seconds = time.time() - t0
        journal.write(step=name, event="done", seconds=seconds, peak_memory_mb=peak_memory_since_reset())
        log.info("%s: finished in %.0f s", header, seconds)
    if "report" in plan.steps:
        from .report import render_report

        out = render_report(plan.run)
        log.info("report: %s", out)
    return plan


__all__ = ["ORDER", "Plan", "check_data_files", "missing_data_files", "plan_pipeline", "prepare_data", "run_pipeline", "shared_prompts",
           "step_costs"]
