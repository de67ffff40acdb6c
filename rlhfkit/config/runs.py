"""The configs around the steps: candidates, evaluation, the whole pipeline, chat."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field

from .base import GenerationSettings, Section
from .steps import DPOConfig, PPOConfig, RewardConfig, SFTConfig


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
