"""The configs of the pipeline's steps: SFT, generation, the reward model, PPO / RLOO / GRPO, DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from .base import GenerationSettings, Section, TrainingSettings


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
    share_prompt: bool = False
    """Train on one row per comparison: its prompt once, then each response, which attends to the prompt and to
    itself only (a block mask), so each response is scored as its own row would be, from fewer tokens (1.5x fewer
    on HH-RLHF). The rows of a comparison then keep the same prompt tokens: those its longest response leaves
    (a shorter response may see fewer than it would alone). Held-out rows are truncated each on its own either way."""
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
    max_train_comparisons: int | None = Field(None, ge=1)
    """Train on a seeded sample of this many of the training comparisons (after the held-out split); null: all.
    With cache_frozen_features, several epochs over fewer comparisons cost little more than one over them."""
    cache_frozen_features: bool = False
    """With train_top_layers: compute the output of the frozen lower blocks once per training row (the first
    time it is seen) and start every later epoch from it, so only the top blocks run. Same loss and update;
    pays off with epochs > 1. Costs training tokens x hidden x 4 bytes of memory (logged at the start)."""
    cache_eval_features: bool = True
    """With train_top_layers (not under FSDP): keep the held-out rows' output of the frozen lower blocks from the
    first evaluation, so every later evaluation runs only the top blocks. Same scores; costs held-out tokens x
    hidden x 4 bytes of memory (logged at the start). Not kept when the run evaluates once (at the end only)."""


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
    eval_at_start: bool = False
    """Not used by PPO."""
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
