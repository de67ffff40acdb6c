"""Run configuration: one YAML file per run, validated by pydantic.

Every field has a default and a docstring (the docstring is the field's documentation:
`rlhfkit config-doc sft` prints them). The command line overrides any field with
`--field value`, nested fields with dots: `--lora.r 8`, `--model lora`.
"""

from __future__ import annotations

from .base import ConfigError, GenerationSettings, LoraSettings, Section, TrainingSettings
from .loading import describe, load_config, merge_dicts, parse_overrides, save_config
from .steps import DPOConfig, GenerateConfig, PPOConfig, RewardConfig, RolloutSettings, SFTConfig
from .runs import (
    CandidatesConfig,
    ChatConfig,
    EvaluateConfig,
    PipelineConfig,
    PipelineDPOConfig,
    PipelineEvaluateConfig,
    PipelineJudgeConfig,
    PipelineMethod,
    PipelinePPOConfig,
    PipelineRewardConfig,
    PipelineSFTConfig,
)

__all__ = [
    "CandidatesConfig",
    "ChatConfig",
    "ConfigError",
    "DPOConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "GenerationSettings",
    "LoraSettings",
    "PPOConfig",
    "PipelineConfig",
    "PipelineDPOConfig",
    "PipelineEvaluateConfig",
    "PipelineJudgeConfig",
    "PipelineMethod",
    "PipelinePPOConfig",
    "PipelineRewardConfig",
    "PipelineSFTConfig",
    "RewardConfig",
    "RolloutSettings",
    "SFTConfig",
    "Section",
    "TrainingSettings",
    "describe",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "save_config",
]
