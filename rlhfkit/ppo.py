"""Step 3: PPO against the reward model, with a KL penalty toward the SFT policy.

One PPO iteration (`PPOTrainer.iteration`) is, in order:

1. **rollout**: a batch of prompts (left-padded) and one sampled response each; responses are
   cut after their first EOS (`first_eos_mask`).
2. **score**: the frozen reward model reads prompt + response and its score is normalised with
   the statistics saved in step 2, optionally clipped; a response without EOS is penalised.
3. **KL rewards**: per-token KL toward the frozen reference, tuned policy first
   (`kl_t = log pi(y_t) - log pi_ref(y_t)`), reward `-beta * kl_t` on every token plus the score on
   the last one (`rewards_with_kl`).
4. **advantages**: values from the critic on every response position, GAE over response tokens,
   returns = advantages + values, advantages whitened over the rollout's valid tokens.
5. **optimise**: `ppo_epochs` passes over shuffled minibatches: clipped policy loss, clipped value
   loss (`vf_coef`), optional entropy bonus and PPO-ptx loss, gradient clipping.
6. **beta**: the adaptive KL controller moves beta toward `target_kl` (or beta stays fixed).

The maths are the pure functions of `rlhfkit.ppo_math`. Log-probs of the rollout policy, of the
reference and the values are computed ONCE per rollout (no grad) and reused by every epoch, on the
micro-batches of the first epoch (`_rollout_micro_batches`): the first minibatch's ratio is exactly 1.
Logits are computed only on response positions (the LM head runs on the selected hidden states).
Every log-prob is that of the sampler's distribution: softmax(logits / temperature) over the sampling
support (no pad id, no id past the tokenizer), with no other logits processor (`generate.sample_ids`).

Memory layout (W = one network's weights):

* full fine-tuning: four networks - policy (trainable), reference (frozen copy of the SFT
  policy), critic (trainable copy of the reward model's LM + head, or of the policy), reward
  model (frozen). Trainable ones carry gradients and two AdamW moments: about 4W + 2 * 3W = 10W.
* LoRA, critic_init=reward: two base networks. (a) the SFT base carries the "policy" adapter; the
  reference is that base with the adapter disabled (`disable_adapter()`). (b) the reward model's LM
  carries the "critic" adapter + its own value head; the reward model is that base with the adapter
  disabled + the frozen reward head. About 2W + adapters.
* LoRA, critic_init=policy: the SFT base carries both adapters, "policy" and "critic" (peft
  multi-adapter, switched with `set_adapter`), the value head is separate; the reference is the base
  with adapters disabled; the reward model is a separate frozen network. Again about 2W + adapters.
* `train_top_layers: N` (full fine-tuning or LoRA): only the top N blocks train (with LoRA: only they
  carry adapters). The blocks below are frozen and shared, so they compute the same thing for the policy
  and the reference (and for the reward model and the critic) in every pass: their output is computed
  once per rollout (`frozen_activations`) and every later pass - reference, values, all PPO epochs -
  runs only the top N blocks from it, forward and backward (`cache_frozen_activations`).

Multi-process (`accelerate launch`): every process rolls out its share of each iteration's prompts;
the policy and critic are one DDP module (`ActorCritic`), so one backward syncs both; losses are
token-weighted over the global minibatch; whitening, the KL fed to the controller and the logged
statistics are reduced over processes.

Phases and their metrics: `time/generation` (sampling), `time/scoring` (reward model, reference
and rollout-policy log-probs, values), `time/training` (the epochs). `tokens_per_s/generation`
counts generated response tokens; `tokens_per_s/scoring` and `tokens_per_s/training` count
prompt + response tokens read (training: once per epoch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .config import PPOConfig
from .data import load_demonstrations, load_prompts
from .generate import model_path_of, sample_ids, sampling_support
from .models import (
    apply_lora,
    backbone_and_head,
    disable_dropout,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    only_blocks,
    parameters_below_top_layers,
    save_model,
    sync_model_with_tokenizer,
    train_only_top_layers,
    transformer_blocks,
)
from .ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    first_eos_mask,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    rewards_with_kl,
    value_loss,
)
from .sft import ResponseLoss, batch_to_inputs, trained_tokens
from .tokens import encode_example, encode_prompt, pad
from .training import (
    Checkpointer,
    DataPlan,
    MetricsLogger,
    RunDir,
    check_finite,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    reduce_and_finish,
    save_run_config,
    seed_everything,
)

log = logging.getLogger("rlhfkit.ppo")

POLICY_ADAPTER = "policy"
CRITIC_ADAPTER = "critic"
TRAINABLE_WEIGHTS = "trainable.safetensors"


# ----------------------------------------------------------------------------- forward passes


def sequence_hidden(backbone, batch: dict, frozen: torch.Tensor | None = None, split: int = 0) -> torch.Tensor:
    """Final hidden states of prompt + response: ``(B, P + T, H)``.

    The sequence is the left-padded prompt followed by the right-padded response; position ids
    follow the attention mask (as in generation), so left padding does not shift positions. With
    ``frozen`` (the output of the backbone's lower ``split`` blocks, `frozen_hidden`) only the
    blocks above run.
    """
    input_ids, attention, position_ids = _sequence(batch)
    if frozen is None:
        return backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False).last_hidden_state
    with only_blocks(backbone, split):
        return backbone(inputs_embeds=frozen, attention_mask=attention, position_ids=position_ids, use_cache=False).last_hidden_state


def _sequence(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of left-padded prompt + right-padded response."""
    attention = torch.cat([batch["prompt_mask"].long(), batch["mask"].long()], dim=1)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1), attention, position_ids


def frozen_hidden(backbone, batch: dict, split: int) -> torch.Tensor:
    """The output of the backbone's lower ``split`` blocks on prompt + response, ``(B, P + T, H)``.

    With ``train_top_layers`` these blocks are frozen and carry no adapter, so their output is the
    same for every network on the base (policy and reference; reward model and critic) and for every
    PPO epoch: computed once per rollout, it saves their forward passes and all their backward passes.
    """
    input_ids, attention, position_ids = _sequence(batch)
    with only_blocks(backbone, 0, split):
        return backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False).last_hidden_state


def response_hidden(backbone, batch: dict, frozen: torch.Tensor | None = None, split: int = 0) -> torch.Tensor:
    """Hidden states that predict each response token, ``(B, T, H)``: position ``P - 1 + t`` predicts token ``t``."""
    P = batch["prompt_ids"].shape[1]
    return sequence_hidden(backbone, batch, frozen, split)[:, P - 1 : -1]


def policy_logprobs(lm, batch: dict, temperature: float, with_entropy: bool = False, frozen=None, split: int = 0, support=None):
    """Log-probs (and entropy) of the response tokens under ``lm``; logits only on response positions.

    ``temperature`` and ``support`` (the ids the sampler may draw, `sampling_support`) are the sampler's."""
    backbone, head = backbone_and_head(lm)
    logits = head(response_hidden(backbone, batch, frozen, split))
    logprobs = logprobs_from_logits(logits, batch["response_ids"], temperature, support)
    entropy = entropy_from_logits(logits, temperature, support) if with_entropy else None
    return logprobs, entropy


def reward_scores(rm, batch: dict, frozen=None, split: int = 0) -> torch.Tensor:
    """Raw reward-model scores of prompt + response, read at the last response token, ``(B,)``."""
    hidden = sequence_hidden(backbone_and_head(rm.lm)[0], batch, frozen, split)
    last = batch["prompt_ids"].shape[1] - 1 + batch["mask"].sum(1)
    return rm.score_hidden(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


class ActorCritic(torch.nn.Module):
    """The trained networks in one module: the policy LM, the critic's backbone and value head.

    One module means one DDP wrapper and one backward for both (and the PPO-ptx loss). With LoRA
    and ``shared=True`` the critic is the "critic" adapter on the policy's own base network.
    ``support``: the ids the sampler may draw (`sampling_support`); log-probs normalise over them.
    """

    def __init__(
        self, policy, critic_backbone, value_head: torch.nn.Linear, temperature: float, shared: bool,
        policy_split: int = 0, critic_split: int = 0, support: torch.Tensor | None = None,
    ):  # fmt: skip
        super().__init__()
        self.policy = policy
        self.register_buffer("support", support, persistent=False)
        # blocks below these indices are frozen and shared: their output may come precomputed (`frozen_hidden`)
        self.policy_split, self.critic_split = policy_split, critic_split
        self.critic_backbone = None if shared else critic_backbone
        self.value_head = value_head
        self.temperature = temperature
        self.shared = shared
        # Not registered as a submodule (it holds the same policy); reused from SFT for PPO-ptx.
        self.__dict__["_ptx_loss"] = ResponseLoss(policy)
        self.__dict__["_trainable"] = []

    def freeze_trainable_set(self) -> None:
        """Remember which parameters train; peft's adapter switching toggles requires_grad, we restore it."""
        self.__dict__["_trainable"] = [p for p in self.parameters() if p.requires_grad]

    def restore_trainable(self) -> None:
        for p in self._trainable:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def adapter(self, name: str):
        """Make adapter ``name`` active (shared-base LoRA only); the policy adapter is active otherwise."""
        if not self.shared:
            yield
            return
        try:
            self.policy.set_adapter(name)
            self.restore_trainable()
            yield
        finally:
            self.policy.set_adapter(POLICY_ADAPTER)
            self.restore_trainable()

    def recompute_context(self):
        """``context_fn`` of activation checkpointing: called in a block's forward, it returns the context of
        the block's recomputation in the backward pass, which runs the adapter that was active in the forward.
        Without it the critic's blocks would be recomputed through the policy adapter (active again by then)."""
        return contextlib.nullcontext(), self.adapter(self.policy.active_adapter)

    def critic_body(self):
        return backbone_and_head(self.policy)[0] if self.shared else self.critic_backbone

    def policy_forward(self, batch: dict, with_entropy: bool = False, frozen=None):
        with self.adapter(POLICY_ADAPTER):
            return policy_logprobs(self.policy, batch, self.temperature, with_entropy, frozen, self.policy_split, self.support)

    def values(self, batch: dict, frozen=None) -> torch.Tensor:
        with self.adapter(CRITIC_ADAPTER):
            hidden = response_hidden(self.critic_body(), batch, frozen, self.critic_split)
        # the head runs in fp32 (it is tiny; bf16 values would be coarse)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def forward(
        self, prompt_ids, prompt_mask, response_ids, mask, with_entropy: bool = False, ptx: dict | None = None,
        policy_frozen=None, critic_frozen=None,
    ):  # fmt: skip
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids, "mask": mask}
        logprobs, entropy = self.policy_forward(batch, with_entropy, policy_frozen)
        values = self.values(batch, critic_frozen)
        ptx_sum = ptx_tokens = None
        if ptx is not None:
            with self.adapter(POLICY_ADAPTER):
                ptx_sum, ptx_tokens, _ = self._ptx_loss(**ptx)
        return logprobs, values, entropy, ptx_sum, ptx_tokens


# ----------------------------------------------------------------------------- building the networks


@dataclass
class Networks:
    actor_critic: ActorCritic
    reference: torch.nn.Module | None  # None: the policy with its adapters disabled
    reward_model: torch.nn.Module
    reward_base_peft: object | None  # the critic's peft model when it sits on the reward model's LM
    tokenizer: object
    rm_tokenizer: object
    rm_stats: dict
    same_vocab: bool  # the reward model reads the policy's token ids as they are (`reward.shares_tokens`)
    layout: str
    reward_split: int = 0  # the reward model's blocks below this index are shared with the critic (frozen)

    def trainable_names(self) -> tuple[list[str], list[str]]:
        """Names of the trainable parameters of the policy and of the critic."""
        policy, critic = [], []
        for name, p in self.actor_critic.named_parameters():
            if not p.requires_grad:
                continue
            is_critic = name.startswith(("value_head.", "critic_backbone.")) or f".{CRITIC_ADAPTER}." in name
            (critic if is_critic else policy).append(name)
        return policy, critic


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _copy_sharing(model: torch.nn.Module, shared: list[torch.nn.Parameter]) -> torch.nn.Module:
    """A deep copy of ``model`` in which the ``shared`` parameters are the original tensors."""
    return copy.deepcopy(model, {id(p): p for p in shared})


def _store_frozen_as(dtype: torch.dtype, *modules) -> None:
    """Cast the frozen floating-point parameters of ``modules`` to ``dtype`` in place."""
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def value_head_from_reward(rm_head: torch.nn.Linear, mean: float, std: float) -> torch.nn.Linear:
    """A copy of the reward head rescaled to predict normalised scores: (w h + b - mean) / std."""
    head = torch.nn.Linear(rm_head.in_features, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(rm_head.weight.float() / std)
        bias = rm_head.bias.float() if rm_head.bias is not None else torch.zeros(1)
        head.bias.copy_((bias - mean) / std)
    return head


def build_networks(cfg: PPOConfig, device) -> Networks:
    """Load the SFT policy, the reference, the reward model and the critic (see the module docstring)."""
    from .reward import load_reward_model, reads_policy_vocabulary, shares_tokens

    policy_path = model_path_of(cfg.policy_model)
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    # Any sequence-classification reward model (a folder, a run folder meaning its final/, a hub id).
    rm, rm_tokenizer, rm_stats = load_reward_model(cfg.reward_model, torch.float32)
    disable_dropout(rm)
    same_vocab = reads_policy_vocabulary(rm_tokenizer, tokenizer)
    # The fast path hands the reward model the policy's token ids; otherwise the text is re-encoded in its layout.
    reads_policy_ids = shares_tokens(rm, rm_tokenizer, tokenizer)
    if cfg.critic_init == "reward" and not same_vocab:
        raise ValueError(
            f"critic_init: reward needs the reward model ({cfg.reward_model}) to share the policy's vocabulary "
            "(the critic reads the policy's tokens); use critic_init: policy"
        )
    if cfg.critic_init == "reward" and rm.lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        rm_pad = rm.lm.config.pad_token_id  # the reward model still reads its own text as before
        sync_model_with_tokenizer(rm.lm, tokenizer)  # the policy's pad row, which the critic reads (masked)
        rm.lm.config.pad_token_id = rm_pad

    policy = load_causal_lm(policy_path, tokenizer, dtype=torch.float32)  # dropout off
    lora = cfg.lora.enabled
    top = cfg.train_top_layers
    reward_base_peft = None
    if not lora:
        # With train_top_layers the frozen lower blocks are one set of tensors: the reference shares
        # the policy's, the critic shares the reward model's (deepcopy with those tensors memoised).
        train_only_top_layers(policy, top)
        reference = _freeze(_copy_sharing(policy, parameters_below_top_layers(policy, top)))
        source = rm.lm if cfg.critic_init == "reward" else policy
        shared = parameters_below_top_layers(source, top)
        critic_backbone = backbone_and_head(_copy_sharing(source, shared))[0]
        shared_ids = {id(q) for q in shared}
        for p in critic_backbone.parameters():
            p.requires_grad_(id(p) not in shared_ids)
        layout = "full fine-tuning: policy, frozen reference copy, critic, frozen reward model (4 networks)"
        if top:
            layout += f"; only the top {top} blocks train, the blocks below are shared by policy and reference, critic and reward model"
    else:  # with train_top_layers, adapters on the top blocks only
        reference = None
        policy = apply_lora(policy, cfg.lora, adapter_name=POLICY_ADAPTER, top_layers=top)
        if cfg.critic_init == "policy":
            policy.add_adapter(CRITIC_ADAPTER, lora_config(cfg.lora, model=policy, top_layers=top))
            policy.set_adapter(POLICY_ADAPTER)
            critic_backbone = None
            layout = (
                "LoRA: SFT base with adapters 'policy' and 'critic' (reference = adapters disabled) + "
                "separate frozen reward model (2 base networks)"
            )
        else:
            # task_type None: a plain PeftModel (a sequence classifier is no causal LM); the critic reads its body.
            reward_base_peft = apply_lora(rm.lm, cfg.lora, adapter_name=CRITIC_ADAPTER, task_type=None, top_layers=top)
            critic_backbone = backbone_and_head(reward_base_peft)[0]
            layout = (
                "LoRA: SFT base with adapter 'policy' (reference = adapter disabled) + reward-model base with "
                "adapter 'critic' (reward model = adapter disabled) (2 base networks)"
            )
        if top:
            layout += f"; adapters on the top {top} blocks only"
    _freeze(rm)  # the reward model (and, with LoRA, its base) is frozen; the critic adapter is re-enabled below

    hidden = policy.config.hidden_size if cfg.critic_init == "policy" else rm.head.in_features
    if cfg.critic_init == "reward":
        value_head = value_head_from_reward(rm.head, float(rm_stats.get("mean", 0.0)), float(rm_stats.get("std", 1.0)))
    else:
        value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(value_head.bias)

    # The frozen blocks below the top `top` ones compute the same for every network on their base and
    # for every epoch: with cache_frozen_activations their output is computed once per rollout.
    policy_split = reward_split = 0
    if top and cfg.cache_frozen_activations:
        policy_split = len(transformer_blocks(policy)) - top
        reward_split = len(transformer_blocks(rm.lm)) - top if cfg.critic_init == "reward" else 0
        layout += "; the output of the frozen blocks below is computed once per rollout"
    critic_split = reward_split if cfg.critic_init == "reward" else policy_split
    support = sampling_support(policy.get_output_embeddings().weight.shape[0], len(tokenizer), tokenizer.pad_token_id)
    actor_critic = ActorCritic(
        policy, critic_backbone, value_head, cfg.generation.temperature, shared=lora and cfg.critic_init == "policy",
        policy_split=policy_split, critic_split=critic_split, support=support,
    )  # fmt: skip
    # trainable: the policy and critic (full, or their top blocks), or the adapters + value head (LoRA)
    for name, p in actor_critic.named_parameters():
        if lora:
            p.requires_grad_(".lora_" in name or name.startswith("value_head."))
        elif not top:
            p.requires_grad_(True)
    value_head.requires_grad_(True)
    if lora and cfg.lora.dropout:
        log.info("lora.dropout %.2f is switched off: PPO needs deterministic log-probs", cfg.lora.dropout)
    disable_dropout(actor_critic)  # dropout off everywhere, LoRA branches included
    actor_critic.freeze_trainable_set()
    if cfg.gradient_checkpointing:
        # shared base: a block is recomputed through the adapter it ran with (`ActorCritic.recompute_context`)
        context = {"context_fn": actor_critic.recompute_context} if actor_critic.shared else {}
        for model in {id(m): m for m in (policy, critic_backbone) if m is not None}.values():
            enable_activation_checkpointing(model, **context)
    if cfg.precision == "bf16":
        # Frozen weights are only read, and autocast reads matrices in bf16 anyway: storing them in bf16
        # halves the policy's LoRA base and the blocks shared below train_top_layers. Trained weights stay
        # fp32, and so do the reference's own copies of them: the reference then computes exactly what the
        # policy computed at the start (KL 0), not a bf16 rounding of it. The reward model (and a critic on
        # its base) keeps the fp32 weights its reward_stats.json was measured with: in bf16 the normalised
        # scores would drift from the saved mean.
        _store_frozen_as(torch.bfloat16, actor_critic.policy)
    actor_critic.to(device)
    if reference is not None:
        reference.to(device)
    rm.to(device)
    return Networks(
        actor_critic, reference, rm, reward_base_peft, tokenizer, rm_tokenizer, rm_stats, reads_policy_ids, layout, reward_split
    )


# ----------------------------------------------------------------------------- the rollout batch


@dataclass
class Rollout:
    """One iteration's experience on this process. Per-token tensors are ``(B, T)``, right-padded."""

    messages: list
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the first EOS
    mask: torch.Tensor  # (B, T) bool: up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool
    rm_scores: torch.Tensor | None = None  # (B,) normalised reward-model scores
    scores: torch.Tensor | None = None  # (B,) after clipping and the missing-EOS penalty
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # per token, the estimator of the reward
    kl_k1: torch.Tensor | None = None  # per token, k1 (logged, fed to the controller)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # (B, P + T, H): output of the frozen lower blocks of the policy's base and of the reward model's base
    policy_frozen: torch.Tensor | None = None
    reward_frozen: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def micro(self, idx: torch.Tensor | slice) -> dict:
        """Rows ``idx``, trimmed: no all-padding prompt columns, no response columns past the longest response."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx]
        keep_from = int(out["prompt_mask"].any(0).long().argmax())  # left padding: a suffix of columns is kept
        T = max(1, int(out["mask"].sum(1).max()))
        P = self.prompt_ids.shape[1]
        for name, value in out.items():
            if name in ("prompt_ids", "prompt_mask"):
                out[name] = value[:, keep_from:]
            elif name in ("policy_frozen", "reward_frozen"):
                out[name] = value[:, keep_from : P + T]
            elif value.dim() == 2:
                out[name] = value[:, :T]
        return out


def _model_batch(micro: dict) -> dict:
    return {k: micro[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "mask")}


# ----------------------------------------------------------------------------- checkpointing of trainable weights


def _register_trainable_checkpointing(accelerator, module: ActorCritic) -> None:
    """Checkpoints hold only the trainable weights (adapters + value head with LoRA), not frozen bases."""

    def names() -> list[str]:
        return [n for n, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad]

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if accelerator.unwrap_model(model) is module:
                params = dict(module.named_parameters())
                weights[i] = {n: params[n].detach().contiguous() for n in names()}

    def load_hook(models, input_dir):
        for model in list(models):
            if accelerator.unwrap_model(model) is module:
                index = [accelerator.unwrap_model(m) for m in accelerator._models].index(module)
                file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
                state = load_file(str(file), device=str(next(module.parameters()).device))
                missing = set(names()) - set(state)
                unexpected = set(state) - set(dict(module.named_parameters()))
                if missing or unexpected:
                    raise RuntimeError(f"{file}: checkpoint does not match the model (missing {sorted(missing)[:3]}, "
                                       f"unexpected {sorted(unexpected)[:3]})")
                module.load_state_dict(state, strict=False)
                models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------- the trainer


def _sync(device) -> None:
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class _Params:
    """A parameter list that `make_optimizer` accepts like a module."""

    def __init__(self, params):
        self._params = list(params)

    def parameters(self):
        return iter(self._params)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig):
        self._check_config(cfg)
        self.cfg = cfg
        self.run = RunDir(cfg.output_dir)
        self.accelerator = acc = make_accelerator(cfg)
        n = acc.num_processes
        if cfg.prompts_per_iteration % n or cfg.minibatch_size % n or cfg.prompts_per_iteration % cfg.minibatch_size:
            raise ValueError(
                f"prompts_per_iteration ({cfg.prompts_per_iteration}) must be a multiple of minibatch_size "
                f"({cfg.minibatch_size}), and both multiples of the number of processes ({n})"
            )
        seed_everything(cfg.seed)
        if acc.is_main_process:
            save_run_config(cfg, self.run)

        self.nets = build_networks(cfg, acc.device)
        self.tokenizer = self.nets.tokenizer
        log.info("PPO layout: %s", self.nets.layout)
        rm_precision = self.nets.rm_stats.get("precision", "fp32")
        log.info("the reward model scores in %s with fp32 weights, as its reward_stats.json was measured", rm_precision)
        self.prompts = load_prompts(cfg.prompts)
        if not self.prompts:
            raise ValueError(f"{cfg.prompts}: no prompts")
        self.local_prompts = cfg.prompts_per_iteration // n
        self.local_minibatch = cfg.minibatch_size // n
        self.n_minibatches = cfg.prompts_per_iteration // cfg.minibatch_size
        self.micro_per_minibatch = math.ceil(self.local_minibatch / cfg.batch_size)
        self.plan = DataPlan(
            items=self.prompts, batch_size=self.local_prompts, grad_accum=1,
            num_processes=n, process_index=acc.process_index, seed=cfg.seed,
        )  # fmt: skip
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.prompts) / cfg.prompts_per_iteration))
        self.ptx_plan = self._ptx_plan() if cfg.ptx_data else None

        policy_names, critic_names = self.nets.trainable_names()
        params = dict(self.nets.actor_critic.named_parameters())
        self.policy_params = [params[name] for name in policy_names]
        self.critic_params = [params[name] for name in critic_names]
        opt_steps = self.total * cfg.ppo_epochs * self.n_minibatches
        critic_cfg = cfg.model_copy(update={"learning_rate": cfg.critic_learning_rate or cfg.learning_rate})
        policy_opt = make_optimizer(_Params(self.policy_params), cfg)
        critic_opt = make_optimizer(_Params(self.critic_params), critic_cfg)
        policy_sched = make_scheduler(policy_opt, cfg, opt_steps)
        critic_sched = make_scheduler(critic_opt, critic_cfg, opt_steps)
        _register_trainable_checkpointing(acc, self.nets.actor_critic)
        (self.model, self.policy_opt, self.critic_opt, self.policy_sched, self.critic_sched) = acc.prepare(
            self.nets.actor_critic, policy_opt, critic_opt, policy_sched, critic_sched
        )
        self.ac: ActorCritic = acc.unwrap_model(self.model)
        self.kl_ctl = (
            AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.init_kl_coef)
        )
        self.checkpointer = Checkpointer(self.run, acc, cfg.keep_checkpoints)
        self.samples_file = self.run.path / "samples.jsonl"
        self._warned_missing_eos = False
        self._split_checked = False
        self.iteration_index = 0

    @staticmethod
    def _check_config(cfg: PPOConfig) -> None:
        if cfg.generation.temperature <= 0:
            raise ValueError("generation.temperature must be > 0 for PPO (greedy decoding has no log-probs to ratio)")

    def _ptx_plan(self) -> DataPlan:
        demos = load_demonstrations(self.cfg.ptx_data)
        examples = [encode_example(self.tokenizer, d.messages, d.response, self.cfg.ptx_max_length) for d in demos]
        if not examples:
            raise ValueError(f"{self.cfg.ptx_data}: no demonstrations for PPO-ptx")
        return DataPlan(
            items=examples, batch_size=self.cfg.ptx_batch_size, grad_accum=self.micro_per_minibatch,
            num_processes=self.accelerator.num_processes, process_index=self.accelerator.process_index,
            seed=self.cfg.seed + 1, weight=lambda e: float(trained_tokens(e)),
        )  # fmt: skip

    # ------------------------------------------------------------------ 1. rollout

    @torch.no_grad()
    def rollout(self, messages: list) -> Rollout:
        """Sample one response per prompt; truncate after the first EOS."""
        cfg, tok, acc = self.cfg, self.tokenizer, self.accelerator
        gen = cfg.generation
        ids = [encode_prompt(tok, m, gen.max_prompt_length, gen.system_prompt) for m in messages]
        prompt_ids = pad(ids, tok.pad_token_id, side="left").to(acc.device)
        prompt_mask = pad([[1] * len(i) for i in ids], 0, side="left").to(acc.device)
        chunks = []
        self.ac.eval()
        with acc.autocast():
            for start in range(0, len(ids), gen.batch_size):
                p_ids, p_mask = prompt_ids[start : start + gen.batch_size], prompt_mask[start : start + gen.batch_size]
                keep_from = int(p_mask.any(0).long().argmax())
                out = sample_ids(
                    self.ac.policy, p_ids[:, keep_from:], p_mask[:, keep_from:], gen, tok.eos_token_id, tok.pad_token_id, num_tokens=len(tok)
                )
                chunks.append(torch.nn.functional.pad(out, (0, gen.max_new_tokens - out.shape[1]), value=tok.pad_token_id))
        self.ac.train()
        responses = torch.cat(chunks)
        mask, has_eos = first_eos_mask(responses, tok.eos_token_id, tok.pad_token_id)
        mask[:, 0] = True  # the first sampled token always belongs to the response (even if it is the pad id)
        responses = responses.masked_fill(~mask, tok.pad_token_id)
        T = int(mask.sum(1).max())
        return Rollout(messages, prompt_ids, prompt_mask, responses[:, :T], mask[:, :T], has_eos)

    # ------------------------------------------------------------------ frozen lower blocks (train_top_layers)

    @torch.no_grad()
    def frozen_activations(self, batch: Rollout) -> None:
        """With train_top_layers: the output of the frozen lower blocks of the policy's base (shared by policy,
        reference and a critic made from the policy) and of the reward model's base (shared by reward model and
        critic), computed once; every later pass of this rollout starts from it (`frozen_hidden`)."""
        ac, nets = self.ac, self.nets
        if not (ac.policy_split or nets.reward_split):
            return
        (B, P), T = batch.prompt_ids.shape, batch.response_ids.shape[1]
        bases = [("policy_frozen", backbone_and_head(ac.policy)[0], ac.policy_split),
                 ("reward_frozen", backbone_and_head(nets.reward_model.lm)[0], nets.reward_split)]  # fmt: skip
        with self.accelerator.autocast():
            for rows in self._rollout_micro_batches(batch):
                micro = batch.micro(rows)  # trimmed: its columns are [P - P', P + T') of the rollout's
                columns = slice(P - micro["prompt_ids"].shape[1], P + micro["mask"].shape[1])
                for name, backbone, split in bases:
                    if not split:
                        continue
                    hidden = frozen_hidden(backbone, _model_batch(micro), split)
                    if getattr(batch, name) is None:
                        setattr(batch, name, hidden.new_zeros(B, P + T, hidden.shape[-1]))
                    getattr(batch, name)[rows, columns] = hidden
        if not self._split_checked:
            self._check_split(batch)

    def _check_split(self, batch: Rollout) -> None:
        """Running the upper blocks from the frozen output must give what the whole network gives. A model
        whose body does more than embed, run its blocks and normalise (e.g. scales its embeddings) fails this;
        then the cache is switched off and every pass runs the whole network."""
        self._split_checked = True
        ac, nets, temperature = self.ac, self.nets, self.cfg.generation.temperature
        micro = batch.micro(torch.arange(min(len(batch), self.cfg.batch_size)))
        with self.accelerator.autocast():
            pairs = []
            if ac.policy_split:
                with ac.adapter(POLICY_ADAPTER):
                    pairs.append((policy_logprobs(ac.policy, micro, temperature, frozen=micro["policy_frozen"], split=ac.policy_split, support=ac.support)[0],
                                  policy_logprobs(ac.policy, micro, temperature, support=ac.support)[0]))  # fmt: skip
            if nets.reward_split:
                with self._reward_model_active():
                    pairs.append((reward_scores(nets.reward_model, micro, micro["reward_frozen"], nets.reward_split),
                                  reward_scores(nets.reward_model, micro)))  # fmt: skip
        mask = micro["mask"]
        for cached, whole in pairs:
            cached, whole = (cached[mask], whole[mask]) if cached.dim() == 2 else (cached, whole)
            if not torch.allclose(cached, whole, rtol=1e-3, atol=1e-3):
                log.warning(
                    "%s: running the upper blocks from the frozen blocks' output differs from the whole network "
                    "(max difference %.3g); cache_frozen_activations is switched off for this run",
                    type(backbone_and_head(ac.policy)[0]).__name__, float((cached - whole).abs().max()),
                )  # fmt: skip
                ac.policy_split = ac.critic_split = nets.reward_split = 0
                batch.policy_frozen = batch.reward_frozen = None
                return

    def _frozen_inputs(self, micro: dict) -> dict:
        """The frozen activations the actor-critic's forward takes (None: run the whole network)."""
        critic = micro.get("reward_frozen") if self.cfg.critic_init == "reward" else micro.get("policy_frozen")
        return {"policy_frozen": micro.get("policy_frozen"), "critic_frozen": critic}

    # ------------------------------------------------------------------ 2. score

    @torch.no_grad()
    def score(self, batch: Rollout) -> None:
        """Reward-model scores, normalised with step 2's statistics; clipping; the missing-EOS penalty.

        The reward model scores as its statistics were measured: fp32 weights, bf16 autocast only if step 2
        ran in bf16 (`reward_stats.json` "precision"), whatever PPO's own precision."""
        cfg, nets, acc = self.cfg, self.nets, self.accelerator
        rm_precision = nets.rm_stats.get("precision", "fp32")
        autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=rm_precision == "bf16")
        with autocast, self._reward_model_active():
            if nets.same_vocab:  # the policy's token ids as they are
                raw = torch.zeros(len(batch), device=acc.device)
                # the frozen blocks' cached output was computed in PPO's precision: reused only if it is the reward model's
                split = nets.reward_split if rm_precision == cfg.precision else 0
                for rows in self._rollout_micro_batches(batch):
                    micro = batch.micro(rows)
                    raw[rows] = reward_scores(nets.reward_model, micro, micro.get("reward_frozen") if split else None, split)
            else:  # another vocabulary: the text, re-encoded with the reward model's own tokenizer and chat template
                from .reward import score

                texts = self.tokenizer.batch_decode(batch.response_ids.masked_fill(~batch.mask, self.tokenizer.pad_token_id), skip_special_tokens=True)
                messages = [self._with_system(m) for m in batch.messages]
                raw = torch.tensor(
                    score(nets.reward_model, nets.rm_tokenizer, messages, [t.strip() for t in texts], cfg.batch_size, normalise=False,
                          complete=batch.has_eos.tolist(),  # a response cut without EOS stays cut
                          max_length=cfg.reward_max_length, precision=rm_precision),
                    dtype=torch.float32, device=acc.device,
                )  # fmt: skip
        std = float(nets.rm_stats.get("std", 1.0)) or 1.0
        rm_scores = (raw - float(nets.rm_stats.get("mean", 0.0))) / std
        check_finite("reward-model score", rm_scores, self.iteration_index + 1)
        scores = rm_scores.clone()
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        missing = ~batch.has_eos
        if cfg.missing_eos == "replace" and not self._warned_missing_eos and missing.any() and (~missing).any():
            if rm_scores[~missing].mean().item() < -cfg.missing_eos_penalty:
                self._warned_missing_eos = True
                log.warning(
                    "complete responses score %.2f on average, below the %.2f that replaces the score of a response "
                    "without EOS: the policy can gain by not stopping. The reward model's normalisation statistics "
                    "do not fit this policy's responses; consider missing_eos: subtract or a larger missing_eos_penalty",
                    rm_scores[~missing].mean().item(), -cfg.missing_eos_penalty,
                )  # fmt: skip
        if cfg.missing_eos == "replace":
            scores = torch.where(missing, torch.full_like(scores, -cfg.missing_eos_penalty), scores)
        elif cfg.missing_eos == "subtract":
            scores = scores - missing.float() * cfg.missing_eos_penalty
        batch.rm_scores, batch.scores = rm_scores, scores

    def _with_system(self, messages: list) -> list:
        sp = self.cfg.generation.system_prompt
        if sp is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": sp}, *messages]
        return messages

    @contextlib.contextmanager
    def _reward_model_active(self):
        """With LoRA and critic_init=reward, the reward model is its base with the critic adapter disabled."""
        peft = self.nets.reward_base_peft
        if peft is None:
            yield
            return
        try:
            with peft.disable_adapter():
                yield
        finally:
            self.ac.restore_trainable()

    @contextlib.contextmanager
    def _reference_active(self):
        """With LoRA the reference is the policy's base with its adapters disabled."""
        if self.nets.reference is not None:
            yield self.nets.reference
            return
        try:
            with self.ac.policy.disable_adapter():
                yield self.ac.policy
        finally:
            self.ac.restore_trainable()

    # ------------------------------------------------------------------ 3. per-token KL and rewards

    @torch.no_grad()
    def logprobs_and_values(self, batch: Rollout) -> None:
        """Rollout-policy log-probs, entropy and values, and reference log-probs: once per rollout."""
        cfg, acc = self.cfg, self.accelerator
        B, T = batch.response_ids.shape
        old, ent, ref, values = (torch.zeros(B, T, device=acc.device) for _ in range(4))
        with acc.autocast():
            for rows in self._rollout_micro_batches(batch):
                micro = batch.micro(rows)
                t = micro["mask"].shape[1]
                frozen = self._frozen_inputs(micro)
                lp, v, e, _, _ = self.ac(**_model_batch(micro), with_entropy=True, **frozen)
                old[rows, :t], values[rows, :t], ent[rows, :t] = lp, v, e
                with self._reference_active() as reference:
                    ref[rows, :t] = policy_logprobs(
                        reference, _model_batch(micro), cfg.generation.temperature, frozen=frozen["policy_frozen"],
                        split=self.ac.policy_split, support=self.ac.support,
                    )[0]  # fmt: skip
        # padding holds the pad id, outside the sampling support (log-prob -inf): stored as 0
        old, ref = torch.where(batch.mask, old, 0.0), torch.where(batch.mask, ref, 0.0)
        batch.old_logprobs, batch.ref_logprobs, batch.entropy, batch.values = old, ref, ent, values

    def _minibatches(self, n_rows: int, iteration: int, epoch: int) -> tuple[torch.Tensor, ...]:
        """This process's minibatches (row indices) of one epoch: a shuffle seeded by run, iteration, epoch, process."""
        cfg, acc = self.cfg, self.accelerator
        g = torch.Generator().manual_seed(((cfg.seed * 100_003 + iteration) * 101 + epoch) * 1009 + acc.process_index)
        return torch.randperm(n_rows, generator=g).split(self.local_minibatch)

    def _rollout_micro_batches(self, batch: Rollout) -> list[torch.Tensor]:
        """The micro-batches of the first epoch, in its order. The no-grad passes over the rollout (old log-probs,
        values, reference, reward model, frozen blocks) use them, so the first minibatch trains on exactly the
        rows, padding and batch shapes its old log-probs were computed with: its ratio is exactly 1, in bf16 too."""
        minibatches = self._minibatches(len(batch), self.iteration_index, 0)
        return [rows for mb in minibatches for rows in self._micro_batches(batch, mb)]

    def _micro_batches(self, batch: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows`` ordered by prompt + response length and split into micro-batches, so they carry little
        padding (the losses are token-weighted sums over micro-batches: their grouping does not change the update)."""
        lengths = (batch.prompt_mask.sum(1) + batch.mask.sum(1)).cpu()[rows]
        return rows[torch.argsort(lengths, stable=True)].to(batch.mask.device).split(self.cfg.batch_size)

    def kl_rewards(self, batch: Rollout, beta: float) -> None:
        """Per-token reward -beta * kl_t, plus the score on the last token."""
        batch.rewards, batch.kl = rewards_with_kl(
            batch.scores, batch.old_logprobs, batch.ref_logprobs, batch.mask, beta, self.cfg.kl_estimator
        )
        batch.kl_k1 = torch.where(batch.mask, kl_penalty(batch.old_logprobs, batch.ref_logprobs, "k1"), 0.0)
        check_finite("reward", batch.rewards[batch.mask], self.iteration_index + 1)

    # ------------------------------------------------------------------ 4. advantages

    def compute_advantages(self, batch: Rollout) -> None:
        """GAE over response tokens; returns = advantages + values; advantages whitened over all processes."""
        cfg = self.cfg
        advantages, batch.returns = gae(batch.rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = self._whiten(advantages, batch.mask)
        batch.advantages = advantages

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return masked_whiten(x, mask)
        n, mean, var = self._global_moments(x, mask)
        var = var * n / max(n - 1, 1)  # unbiased, as masked_whiten
        return torch.where(mask, (x - mean) * torch.rsqrt(torch.as_tensor(var + 1e-8, device=x.device)), 0.0)

    def _global_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
        """Count, mean and (biased) variance of the valid entries over all processes."""
        xv = x[mask].double()
        t = torch.stack([torch.tensor(float(xv.numel()), dtype=torch.float64, device=x.device), xv.sum(), (xv**2).sum()])
        n, s, s2 = self.accelerator.reduce(t, reduction="sum").tolist()
        mean = s / max(n, 1)
        return n, mean, max(s2 / max(n, 1) - mean**2, 0.0)

    def _explained_variance(self, batch: Rollout) -> float:
        if self.accelerator.num_processes == 1:
            return float(explained_variance(batch.values, batch.returns, batch.mask))
        _, _, var_returns = self._global_moments(batch.returns, batch.mask)
        _, _, var_residual = self._global_moments(batch.returns - batch.values, batch.mask)
        return 1.0 - var_residual / var_returns if var_returns > 0 else float("nan")

    # ------------------------------------------------------------------ 5. optimise

    def optimise(self, batch: Rollout, iteration: int) -> dict[str, float]:
        """ppo_epochs passes of shuffled minibatches; returns summed statistics (x_sum / x_count)."""
        cfg, acc = self.cfg, self.accelerator
        n_proc = acc.num_processes
        stats: dict[str, float] = {}

        def add(name: str, value, weight: float) -> None:
            stats[name + "_sum"] = stats.get(name + "_sum", 0.0) + float(value) * weight
            stats[name + "_count"] = stats.get(name + "_count", 0.0) + weight

        token_counts = batch.mask.sum(1)
        for epoch in range(cfg.ppo_epochs):
            minibatches = self._minibatches(len(batch), iteration, epoch)
            # the loss of a minibatch is a token mean over all processes' responses
            local = torch.stack([token_counts[mb.to(token_counts.device)].sum() for mb in minibatches]).double()
            global_tokens = acc.reduce(local, reduction="sum").tolist() if n_proc > 1 else local.tolist()
            for m, mb in enumerate(minibatches):
                ptx = self.ptx_plan.step((iteration * cfg.ppo_epochs + epoch) * self.n_minibatches + m) if self.ptx_plan else None
                micros = self._micro_batches(batch, mb)
                for i, rows in enumerate(micros):
                    last = i == len(micros) - 1
                    ctx = acc.no_sync(self.model) if not last and n_proc > 1 else contextlib.nullcontext()
                    with ctx:
                        self._micro_step(batch, rows, epoch, global_tokens[m], ptx, i, add)
                self._optimiser_step(add)
        return stats

    def _micro_step(self, batch: Rollout, rows, epoch: int, global_tokens: float, ptx, i: int, add) -> None:
        cfg, acc = self.cfg, self.accelerator
        step = self.iteration_index + 1
        micro = batch.micro(rows)
        mask = micro["mask"]
        n_tokens = float(mask.sum())
        ptx_micro = ptx.micro_batches[i] if ptx else None
        ptx_inputs = batch_to_inputs(ptx_micro, self.tokenizer.pad_token_id, acc.device) if ptx_micro else None
        with acc.autocast():
            logprobs, values, entropy, ptx_sum, ptx_tokens = self.model(
                **_model_batch(micro), with_entropy=cfg.entropy_coef > 0, ptx=ptx_inputs, **self._frozen_inputs(micro)
            )
        pg_loss, pg_stats = policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], mask, cfg.clip_range)
        vf_loss, vf_stats = value_loss(values, micro["values"], micro["returns"], mask, cfg.value_clip_range)
        loss = pg_loss + cfg.vf_coef * vf_loss
        if entropy is not None:
            entropy_mean = masked_mean(entropy, mask)
            loss = loss - cfg.entropy_coef * entropy_mean
            add("entropy_train", entropy_mean.item(), n_tokens)
        check_finite("policy loss", pg_loss.detach(), step)
        check_finite("value loss", vf_loss.detach(), step)
        # token-weighted: summed over micro-batches and averaged by DDP over processes = global token mean
        total = loss * (n_tokens * acc.num_processes / global_tokens)
        if ptx_sum is not None:
            check_finite("ptx loss", ptx_sum.detach(), step)
            total = total + cfg.ptx_coef * ptx_sum * (acc.num_processes / ptx.total_weight)
            add("ptx_loss", ptx_sum.item() / max(float(ptx_tokens), 1.0), float(ptx_tokens))
        acc.backward(total)
        add("policy_loss", pg_loss.item(), n_tokens)
        add("value_loss", vf_loss.item(), n_tokens)
        add("policy_clipfrac", pg_stats["clipfrac"].item(), n_tokens)
        add("value_clipfrac", vf_stats["clipfrac"].item(), n_tokens)
        add("approx_kl", pg_stats["approx_kl"].item(), n_tokens)
        add(f"approx_kl_epoch{epoch + 1}", pg_stats["approx_kl"].item(), n_tokens)
        add("ratio", pg_stats["ratio_mean"].item(), n_tokens)

    def _optimiser_step(self, add) -> None:
        acc, cfg = self.accelerator, self.cfg
        step = self.iteration_index + 1
        for name, params, opt, sched in (
            ("policy", self.policy_params, self.policy_opt, self.policy_sched),
            ("critic", self.critic_params, self.critic_opt, self.critic_sched),
        ):
            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            check_finite(f"{name} gradient norm", norm, step)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            add(f"grad_norm_{name}", float(norm), 1.0)

    # ------------------------------------------------------------------ one iteration

    def iteration(self, it: int) -> dict[str, float]:
        """One PPO iteration, in the order of the algorithm (module docstring)."""
        self.iteration_index = it
        cfg, acc = self.cfg, self.accelerator
        beta = self.kl_ctl.value
        messages = self.plan.step(it).micro_batches[0]
        timer = _PhaseTimer(acc.device)

        with timer("generation"):
            batch = self.rollout(messages)  # 1. prompts -> responses, cut after the first EOS
        with timer("scoring"):
            self.frozen_activations(batch)  # train_top_layers: the frozen blocks' output, computed once
            self.score(batch)  # 2. reward-model scores, normalised, penalised
            self.logprobs_and_values(batch)  # old / reference log-probs, values: once per rollout
            self.kl_rewards(batch, beta)  # 3. -beta * kl_t per token + score on the last token
            self.compute_advantages(batch)  # 4. GAE, returns, whitening
        with timer("training"):
            train_stats = self.optimise(batch, it)  # 5. ppo_epochs x minibatches
        rollout_stats = self._rollout_stats(batch)
        reduced = reduce_and_finish(acc, {**rollout_stats, **train_stats})
        self.kl_ctl.update(reduced["kl"], cfg.prompts_per_iteration)  # 6. beta toward the target KL

        metrics = {k: v for k, v in reduced.items() if k not in ("tokens_generated", "tokens_read")}
        metrics["explained_variance"] = self._explained_variance(batch)
        metrics["beta"] = beta
        metrics["beta_next"] = self.kl_ctl.value
        metrics["lr"] = self.policy_sched.get_last_lr()[0]
        for phase, seconds in timer.seconds.items():
            metrics[f"time/{phase}"] = seconds
        metrics["tokens_per_s/generation"] = reduced["tokens_generated"] / max(timer.seconds["generation"], 1e-9)
        metrics["tokens_per_s/scoring"] = reduced["tokens_read"] / max(timer.seconds["scoring"], 1e-9)
        metrics["tokens_per_s/training"] = reduced["tokens_read"] * cfg.ppo_epochs / max(timer.seconds["training"], 1e-9)
        if torch.cuda.is_available() and str(acc.device).startswith("cuda"):
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        else:
            import resource

            metrics["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        check_finite("policy loss", metrics["policy_loss"], it + 1)
        self._last_batch = batch
        return metrics

    def _rollout_stats(self, batch: Rollout) -> dict[str, float]:
        """Sums and counts over this process's rollout (reduced over processes by the caller)."""
        B = float(len(batch))
        mask = batch.mask
        lengths = mask.sum(1).float()
        tokens = float(lengths.sum())
        kl_per_response = batch.kl_k1.sum(1)
        non_score = (-self.kl_ctl.value * batch.kl).sum(1)  # beta of this iteration (updated after)
        prompt_tokens = float(batch.prompt_mask.sum())
        return {
            "score_sum": float(batch.rm_scores.sum()), "score_count": B,
            "score_penalised_sum": float(batch.scores.sum()), "score_penalised_count": B,
            "kl_sum": float(kl_per_response.sum()), "kl_count": B,
            "kl_penalty_sum": float(batch.kl.sum()), "kl_penalty_count": B,
            "non_score_reward_sum": float(non_score.sum()), "non_score_reward_count": B,
            "total_reward_sum": float((non_score + batch.scores).sum()), "total_reward_count": B,
            "entropy_sum": float(batch.entropy[mask].sum()), "entropy_count": tokens,
            "response_length_sum": tokens, "response_length_count": B,
            "eos_share_sum": float(batch.has_eos.float().sum()), "eos_share_count": B,
            "value_mean_sum": float(batch.values[mask].sum()), "value_mean_count": tokens,
            "return_mean_sum": float(batch.returns[mask].sum()), "return_mean_count": tokens,
            "tokens_generated": tokens,
            "tokens_read": tokens + prompt_tokens,
        }  # fmt: skip

    # ------------------------------------------------------------------ running it

    def write_samples(self, it: int) -> None:
        batch = self._last_batch
        n = min(self.cfg.samples_per_log, len(batch))
        kl = batch.kl_k1.sum(1)
        with self.samples_file.open("a") as f:
            for i in range(n):
                tokens = batch.response_ids[i][batch.mask[i]].tolist()
                record = {
                    "iteration": it,
                    "prompt": batch.messages[i][-1]["content"],
                    "messages": batch.messages[i],
                    "response": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    "score": float(batch.rm_scores[i]),
                    "reward_score": float(batch.scores[i]),
                    "kl": float(kl[i]),
                    "has_eos": bool(batch.has_eos[i]),
                    "length": len(tokens),
                }
                f.write(json.dumps(record) + "\n")

    def _trim_samples(self, resume_step: int) -> None:
        if self.samples_file.exists():
            kept = [l for l in self.samples_file.read_text().splitlines() if l and json.loads(l)["iteration"] <= resume_step]
            self.samples_file.write_text("".join(l + "\n" for l in kept))

    def train(self, stop_after: int | None = None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        state = self.checkpointer.load_latest() if cfg.resume else None
        start = state["step"] if state else 0
        if state:
            self.kl_ctl.load_state_dict(state["kl_controller"])
        else:
            seed_everything(cfg.seed + acc.process_index)  # each process samples its own responses
        metrics_log = MetricsLogger(self.run, acc.is_main_process, resume_step=start if state else None, accelerator=acc)
        if acc.is_main_process and state:
            self._trim_samples(start)
        bar = tqdm(total=self.total, initial=start, desc="ppo", disable=not acc.is_main_process, dynamic_ncols=True)
        for it in range(start, self.total):
            metrics = self.iteration(it)
            done = it + 1
            if done % cfg.log_every == 0 or done == self.total:
                metrics_log.log(done, metrics)
            if acc.is_main_process and cfg.sample_every and (done % cfg.sample_every == 0 or done == 1):
                self.write_samples(done)
            bar.set_postfix({"score": f"{metrics['score']:.3f}", "kl": f"{metrics['kl']:.3f}", "beta": f"{metrics['beta']:.4f}"})
            bar.update(1)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == self.total:
                self.checkpointer.save(done, {"total_steps": self.total, "kl_controller": self.kl_ctl.state_dict()})
            if stop_after is not None and done >= stop_after and done < self.total:
                bar.close()
                metrics_log.close()
                return self.run.path
        bar.close()
        metrics_log.close()
        if acc.is_main_process:
            self.save_final()
        acc.wait_for_everyone()
        return self.run.final

    def save_final(self) -> None:
        """The tuned policy in final/ (LoRA merged unless merge_on_save is false); ppo_state.json (iterations,
        final beta and KL-controller state, inputs, layout) in the run folder and in final/."""
        policy = self.ac.policy
        if hasattr(policy, "merge_and_unload"):
            policy = copy.deepcopy(policy)
            if CRITIC_ADAPTER in policy.peft_config:
                policy.delete_adapter(CRITIC_ADAPTER)
            policy.set_adapter(POLICY_ADAPTER)
            if self.cfg.lora.merge_on_save:
                policy = policy.merge_and_unload()
        save_model(policy, self.tokenizer, self.run.final, merge_lora=False)
        state = {
            "iterations": self.total,
            "beta": self.kl_ctl.value,
            "kl_controller": self.kl_ctl.state_dict(),
            "policy_model": self.cfg.policy_model,
            "reward_model": self.cfg.reward_model,
            "critic_init": self.cfg.critic_init,
            "layout": self.nets.layout,
        }
        for folder in (self.run.path, self.run.final):
            (folder / "ppo_state.json").write_text(json.dumps(state, indent=1))


class _PhaseTimer:
    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def run_ppo(cfg: PPOConfig, stop_after: int | None = None) -> Path:
    """Run (or resume) PPO; returns final/ when done (the run folder if stopped early by `stop_after`)."""
    run = RunDir(cfg.output_dir)
    if run.is_done():
        log.info("%s is complete; nothing to do", run.final)
        return run.final
    return PPOTrainer(cfg).train(stop_after=stop_after)
