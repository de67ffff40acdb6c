"""The reward-model folder: the Hugging Face standard, both ways.

What `rlhfkit reward` saves (`final/` of a run) is what transformers and TRL save:

    config.json          LlamaForSequenceClassification (or the backbone's class), num_labels=1, pad_token_id
                         set (the score is read at the last token that is not padding), and `reward_stats`:
                         the normalisation (mean, std, what each was measured on) and the settings it was
                         trained with (max_length, max_prompt_share, input_layout, base model, held-out metrics)
    model.safetensors    the weights, LoRA merged (the head `score.weight` included)
    tokenizer files      with the chat template and a pad token distinct from EOS

`AutoModelForSequenceClassification.from_pretrained(folder)` gives the raw score; rlhfkit applies
(raw - mean) / std when it scores. `load_reward_model` reads that, any other sequence-classification
reward model (a TRL `RewardTrainer` output, a hub id in the HF cache), a peft adapter of one
(task SEQ_CLS, head in `modules_to_save`) and the folders of earlier rlhfkit versions (a causal LM +
`reward_head.safetensors` + `reward_stats.json`; `rlhfkit reward-convert` rewrites them in the standard
form). Anything else fails with an error that names the folder and what is wrong.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ..models import disable_dropout, load_tokenizer, resolve_model
from .model import LAYOUT_EOS, RewardModel, score_head, sequence_classifier_from

log = logging.getLogger("rlhfkit.reward")

STATS_KEY = "reward_stats"  # in config.json
LEGACY_HEAD_FILE = "reward_head.safetensors"  # rlhfkit before the standard format
LEGACY_STATS_FILE = "reward_stats.json"


class NotARewardModelError(ValueError):
    """The folder (or hub id) holds a model, but not a reward model."""


def _json_safe(stats: dict) -> dict:
    """Stats as config.json can hold them (numbers as floats, paths as strings)."""
    return json.loads(json.dumps(stats, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


def save_reward_model(rm: RewardModel, tokenizer, out_dir: str | Path, stats: dict) -> Path:
    """Write the reward model folder (see the module docstring) atomically: everything goes into a
    temporary folder that is renamed at the end."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stats = _json_safe({"input_layout": LAYOUT_EOS, **stats})
    model = rm.lm
    if hasattr(model, "merge_and_unload"):  # LoRA: the adapters and the trained head copy merged in
        model = copy.deepcopy(model).merge_and_unload()
    model.config.num_labels = 1
    model.config.pad_token_id = tokenizer.pad_token_id
    setattr(model.config, STATS_KEY, stats)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging = staging_root / out_dir.name
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    rm.stats = dict(stats)
    return out_dir


def reward_model_path(path: str | Path) -> Path:
    """A run folder stands for its final/ model; a hub id is returned as it is."""
    path = Path(path)
    if (path / "final" / "config.json").exists() or (path / "final" / "adapter_config.json").exists():
        return path / "final"
    return path


def check_reward_config(config, name: str) -> None:
    """Raise NotARewardModelError unless `config` is a sequence-classification model with one label."""
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"a causal language model ({archs[0]})" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else f"a model of architecture {archs or 'unknown'}"
        raise NotARewardModelError(
            f"{name}: {what}, not a reward model. A reward model is a sequence-classification model with "
            f"num_labels=1 (AutoModelForSequenceClassification); train one on it with `rlhfkit reward --model {name}`"
        )
    if config.num_labels != 1:
        labels = ", ".join(str(v) for v in (config.id2label or {}).values())
        raise NotARewardModelError(
            f"{name}: a sequence-classification model with num_labels={config.num_labels} ({labels}), not a reward "
            "model: a reward model gives one score per text (num_labels=1)"
        )


def _reward_tokenizer(name: str):
    """The reward model's own tokenizer, as it was saved (nothing added: its vocabulary is the model's)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.chat_template is None:
        raise NotARewardModelError(f"{name}: its tokenizer has no chat template; rlhfkit renders conversations with the reward model's own template")
    if tokenizer.pad_token_id is None:  # padding only: the score position comes from the attention mask
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_adapter(path: Path, dtype: torch.dtype):
    """A peft sequence-classification adapter (its head in modules_to_save) merged into its base."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(path))
    if str(config.task_type) != "SEQ_CLS":
        raise NotARewardModelError(
            f"{path}: a peft adapter for task {config.task_type}, not a reward model (an adapter of a reward model has "
            "task_type SEQ_CLS and the score head in modules_to_save)"
        )
    has_tokenizer = (path / "tokenizer_config.json").exists()
    tokenizer = _reward_tokenizer(str(path) if has_tokenizer else config.base_model_name_or_path)
    base = sequence_classifier_from(config.base_model_name_or_path, tokenizer, dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload(), tokenizer


def load_legacy_reward_model(path: Path, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, object, dict]:
    """A folder of rlhfkit before the standard format: causal LM + reward_head.safetensors + reward_stats.json."""
    if not (path / LEGACY_STATS_FILE).exists():
        raise NotARewardModelError(f"{path}: has {LEGACY_HEAD_FILE} but no {LEGACY_STATS_FILE}; retrain it with `rlhfkit reward`")
    log.warning(
        "%s is a reward model of an earlier rlhfkit (%s); read as such. Convert it once to the standard form with "
        "`rlhfkit reward-convert %s NEW_FOLDER`", path, LEGACY_HEAD_FILE, path,
    )  # fmt: skip
    stats = json.loads((path / LEGACY_STATS_FILE).read_text())
    tokenizer = load_tokenizer(str(path))
    model = sequence_classifier_from(str(path), tokenizer, dtype)
    weights = load_file(str(path / LEGACY_HEAD_FILE))
    with torch.no_grad():
        score_head(model).weight.copy_(weights["weight"])
    # The standard head has no bias: raw scores drop by the old bias, and so does the mean they are
    # normalised with; normalised scores are unchanged.
    bias = float(weights["bias"].item()) if "bias" in weights else 0.0
    stats = {**stats, "mean": float(stats.get("mean", 0.0)) - bias, "input_layout": LAYOUT_EOS, "converted_from": LEGACY_HEAD_FILE}
    setattr(model.config, STATS_KEY, stats)
    rm = RewardModel(model, stats).eval()
    return rm, tokenizer, stats


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, object, dict]:
    """(reward model in eval mode, its tokenizer, its statistics) from a reward-model folder, a run folder
    whose final/ is one, or a hub id in the HF cache (see the module docstring for what is read)."""
    where = reward_model_path(path)
    name = str(where)
    if where.exists() and (where / LEGACY_HEAD_FILE).exists():
        return load_legacy_reward_model(where, dtype)
    if where.exists() and not (where / "config.json").exists() and (where / "adapter_config.json").exists():
        model, tokenizer = _load_adapter(where, dtype)
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_model(name))
        except OSError as e:
            raise FileNotFoundError(f"{name}: no reward model there (not a folder with config.json, nor a hub id in the HF cache): {e}") from e
        check_reward_config(config, name)
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name), dtype=dtype)
        tokenizer = None
    try:
        score_head(model)
    except ValueError as e:
        raise NotARewardModelError(f"{name}: {e}") from e
    tokenizer = tokenizer or _reward_tokenizer(name)
    stats = dict(getattr(model.config, STATS_KEY, None) or {})
    if "mean" not in stats or "std" not in stats:
        log.warning("%s has no normalisation statistics (config.json `%s`): its scores are used raw", name, STATS_KEY)
    disable_dropout(model)
    rm = RewardModel(model, stats).eval()
    return rm, tokenizer, stats


def convert_legacy_reward_model(old: str | Path, new: str | Path) -> Path:
    """Rewrite an earlier rlhfkit reward-model folder in the standard form (same normalised scores)."""
    old = reward_model_path(old)
    if not (old / LEGACY_HEAD_FILE).exists():
        raise NotARewardModelError(f"{old}: no {LEGACY_HEAD_FILE}; not a reward-model folder of an earlier rlhfkit")
    rm, tokenizer, stats = load_legacy_reward_model(old)
    return save_reward_model(rm, tokenizer, new, stats)
