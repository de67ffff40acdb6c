"""The data side of `rlhfkit pipeline`: the held-out splits it writes to data/ (PPO's prompts and the evaluation's,
the reward model's comparisons and the judge's, the reward step's held-out comparisons), the check that a given judge
shares no prompt with the reward model, and the check that every data file the steps read exists."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    from .pipeline import Plan

log = logging.getLogger("rlhfkit.pipeline")


# ----------------------------------------------------------------------------- held-out data


def _write_if_changed(path: Path, records: list) -> bool:
    """Write JSONL records unless the file already holds exactly them (keeps its mtime on re-runs)."""
    from .data import comparison_to_json, prompt_to_json

    lines = []
    for r in records:
        obj = prompt_to_json(r) if isinstance(r, list) else comparison_to_json(r)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    text = "".join(lines)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def shared_prompts(first: list, second: list) -> set[str]:
    """Prompts (opening user turns, the key of `split_by_prompt`) that two lists of records both have."""
    from .data import prompt_key  # the one definition of "the same prompt" (split_by_prompt keys on it)

    return {prompt_key(r) for r in first} & {prompt_key(r) for r in second}


def prepare_data(plan: Plan) -> None:
    """Write the splits the plan needs (deterministic; unchanged files are not rewritten); check that a given
    judge.data shares no prompt with reward.data."""
    from .data import load_comparisons, load_prompts, split_by_prompt

    sj = plan.judge_comparisons
    if sj is not None:
        reward_part, judge_part = split_by_prompt(load_comparisons(sj.spec, score_range=sj.score_range), sj.fraction, seed=sj.seed)
        if not reward_part or not judge_part:
            raise ValueError(f"{sj.spec}: giving {sj.fraction:.0%} of the prompts to the judge leaves {len(reward_part)} comparisons "
                             f"for the reward model and {len(judge_part)} for the judge")  # fmt: skip
        _write_if_changed(sj.train_file, reward_part)
        _write_if_changed(sj.heldout_file, judge_part)
        log.info("comparisons split by prompt: %d for the reward model (%s), %d for the judge (%s)",
                 len(reward_part), sj.train_file, len(judge_part), sj.heldout_file)  # fmt: skip
    if plan.judge_data_check is not None:
        reward_spec, judge_spec = plan.judge_data_check
        shared = shared_prompts(load_comparisons(reward_spec, score_range=None), load_comparisons(judge_spec, score_range=None))
        if shared:
            example = next(iter(sorted(shared)))[:80]
            raise ConfigError(
                f"pipeline: field 'judge.data': {len(shared)} prompt(s) of the judge's comparisons are also in reward.data "
                f"(e.g. {example!r}): a judge that saw the reward model's prompts is not independent. Leave judge.data "
                "unset to split reward.data by prompt (judge_prompt_fraction), or give comparisons of other prompts."
            )
    ev = plan.configs.get("evaluate")
    sp = plan.heldout_prompts
    if sp is not None:
        train, held = split_by_prompt(load_prompts(sp.spec), sp.fraction, seed=sp.seed)
        if not train or not held:
            raise ValueError(f"{sp.spec}: holding out {sp.fraction:.0%} of the prompts leaves {len(train)} for PPO and {len(held)} for evaluation")
        _write_if_changed(sp.train_file, train)
        _write_if_changed(sp.heldout_file, held)
        log.info("prompts: %d for PPO (%s), %d held out for evaluation (%s)", len(train), sp.train_file, len(held), sp.heldout_file)
    sc = plan.heldout_comparisons
    if sc is not None:
        _, held = split_by_prompt(load_comparisons(sc.spec, score_range=sc.score_range), sc.fraction, seed=sc.seed)
        _write_if_changed(sc.heldout_file, held)
        log.info("the reward model's held-out comparisons: %d (%s)", len(held), sc.heldout_file)
    rl = next((plan.configs[name] for name, algorithm in plan.methods.items() if algorithm != "dpo"), None)
    if ev is not None and ev.other_prompts is not None and rl is not None:
        shared = shared_prompts(load_prompts(ev.other_prompts), load_prompts(rl.prompts))
        if shared:
            log.warning("evaluate.other_prompts: %d of its prompts are also PPO training prompts: that column is then "
                        "partly in distribution", len(shared))  # fmt: skip


# ----------------------------------------------------------------------------- data files

DATA_FIELDS = {
    "sft": ("data", "eval_data"),
    "reward": ("data", "eval_data", "reference_data"),
    "judge": ("data", "eval_data", "reference_data"),
    "ppo": ("prompts", "ptx_data"),
    "dpo": ("data", "eval_data"),
    "evaluate": ("prompts", "other_prompts", "comparisons"),
}
HOW_TO_GET_DATA = (
    "rlhfkit's example data is bundled in examples/data/ (examples/data/README.md says what each file is, where it comes "
    "from and how it was made): run from the project root, or point the field at your copy (e.g. `--reward.data PATH`)."
)


def missing_data_files(cfg: PipelineConfig, plan: Plan) -> list[str]:
    """'field: path' for every data file that the steps to run (and the splits the pipeline makes) read but that
    does not exist."""
    from .data import parse_spec

    sections = [("dpo" if plan.methods[s] == "dpo" else "ppo") if s in plan.methods else s for s in plan.steps]
    wanted = {(section, name) for section in sections if section in DATA_FIELDS for name in DATA_FIELDS[section]}
    if plan.heldout_prompts is not None:
        wanted.add(("ppo", "prompts"))
    if plan.judge_comparisons is not None or plan.heldout_comparisons is not None:
        wanted.add(("reward", "data"))
    if plan.judge_data_check is not None:
        wanted |= {("reward", "data"), ("judge", "data")}
    missing = []
    from .pipeline import ORDER

    for section, name in sorted(wanted, key=lambda w: (ORDER.index(w[0]) if w[0] in ORDER else 9, w[1])):
        value = getattr(getattr(cfg, section, None), name, None)
        for spec in value if isinstance(value, list) else [value] if value else []:
            path = Path(parse_spec(spec)[1])
            if not path.exists():
                missing.append(f"field '{section}.{name}': {path}")
    return missing


def check_data_files(cfg: PipelineConfig, plan: Plan) -> None:
    missing = missing_data_files(cfg, plan)
    if missing:
        raise FileNotFoundError(
            f"pipeline: data file(s) not found (paths are relative to {Path.cwd()}):\n  " + "\n  ".join(missing) + "\n" + HOW_TO_GET_DATA
        )


__all__ = ["DATA_FIELDS", "check_data_files", "missing_data_files", "prepare_data", "shared_prompts"]
