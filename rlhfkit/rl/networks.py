"""Which networks play policy, reference, critic and reward model, and the forward passes they share.

Memory layout (W = one network's weights):

* full fine-tuning: policy (trainable), reference (frozen copy of the SFT policy), reward model (frozen)
  and, for PPO only, a critic (trainable copy of the reward model's LM + head, or of the policy).
  Trainable ones carry gradients and two AdamW moments: PPO about 4W + 2 * 3W = 10W; RLOO/GRPO 3W + 3W = 6W.
* LoRA, critic_init=reward (PPO): two base networks. (a) the SFT base carries the "policy" adapter; the
  reference is that base with the adapter disabled (`disable_adapter()`). (b) the reward model's LM
  carries the "critic" adapter + its own value head; the reward model is that base with the adapter
  disabled + the frozen reward head. About 2W + adapters.
* LoRA, critic_init=policy (PPO): the SFT base carries both adapters, "policy" and "critic" (peft
  multi-adapter, switched with `set_adapter`), the value head is separate; the reference is the base
  with adapters disabled; the reward model is a separate frozen network. Again about 2W + adapters.
* LoRA, RLOO/GRPO: no critic; the SFT base with the "policy" adapter, and the reward model. 2W + adapter.
* `train_top_layers: N`: only the top N blocks train (with LoRA: only they carry adapters). The blocks
  below are frozen and shared by policy and reference (and by reward model and critic); their output can
  be computed once per rollout (`rlhfkit.rl.frozen_cache`).
* sharded (FSDP2, `build_networks(..., sharded=True)`): the trained module (policy, critic, value head)
  is sharded by the trainer; networks share no tensors (a sharded copy cannot share with a whole one): the
  full fine-tuning reference is its own frozen copy, sharded too; the reward model is kept whole on each
  process, in the fp32 weights its statistics were measured with, and a critic on its base gets its own copy
  (sharded); the frozen-block cache is off (see `rlhfkit.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass

import torch

from ..config import PPOConfig
from ..generate import model_path_of, sampling_support
from ..losses import response_token_loss
from ..models import (
    apply_lora,
    backbone_and_head,
    disable_dropout,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    only_blocks,
    parameters_below_top_layers,
    release_checkpoint_file,
    replace_data,
    store_frozen_linear_weights_as,
    sync_model_with_tokenizer,
    train_only_top_layers,
    transformer_blocks,
)
from .logprobs import entropy_from_logits, logprobs_from_logits

log = logging.getLogger("rlhfkit.rl")

POLICY_ADAPTER = "policy"
CRITIC_ADAPTER = "critic"
MODEL_INPUTS = ("prompt_ids", "prompt_mask", "response_ids", "mask")


# ----------------------------------------------------------------------------- forward passes


def model_inputs(batch: dict) -> dict:
    """The four tensors a forward pass reads: left-padded prompt ids and mask, right-padded response ids and mask."""
    return {k: batch[k] for k in MODEL_INPUTS}


def _sequence(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of left-padded prompt + right-padded response."""
    attention = torch.cat([batch["prompt_mask"].long(), batch["mask"].long()], dim=1)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1), attention, position_ids


def sequence_hidden(backbone, batch: dict, frozen: torch.Tensor | None = None, split: int = 0) -> torch.Tensor:
    """Final hidden states of prompt + response: ``(B, P + T, H)``.

    Position ids follow the attention mask (as in generation), so left padding does not shift positions.
    With ``frozen`` (the output of the backbone's lower ``split`` blocks, `frozen_hidden`) only the blocks above run.
    """
    input_ids, attention, position_ids = _sequence(batch)
    if frozen is None:
        return backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False).last_hidden_state
    with only_blocks(backbone, split):
        return backbone(inputs_embeds=frozen, attention_mask=attention, position_ids=position_ids, use_cache=False).last_hidden_state


def frozen_hidden(backbone, batch: dict, split: int) -> torch.Tensor:
    """The output of the backbone's lower ``split`` blocks on prompt + response, ``(B, P + T, H)``."""
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


# ----------------------------------------------------------------------------- the trained module


class ActorCritic(torch.nn.Module):
    """The trained networks in one module: the policy LM and, for PPO, the critic's backbone and value head.

    One module means one DDP wrapper and one backward for everything (and the PPO-ptx loss). With LoRA and
    ``shared=True`` the critic is the "critic" adapter on the policy's own base network. RLOO/GRPO: no critic
    (``value_head`` None). ``support``: the ids the sampler may draw; log-probs normalise over them.
    """

    def __init__(
        self, policy, critic_backbone, value_head: torch.nn.Linear | None, temperature: float, shared: bool,
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
        self.trainable: list[torch.nn.Parameter] = []  # a plain list: not registered twice

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    def freeze_trainable_set(self) -> None:
        """Remember which parameters train; peft's adapter switching toggles requires_grad, we restore it."""
        self.trainable = [p for p in self.parameters() if p.requires_grad]

    def restore_trainable(self) -> None:
        for p in self.trainable:
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

    def values(self, batch: dict, frozen=None) -> torch.Tensor | None:
        if not self.has_critic:
            return None
        with self.adapter(CRITIC_ADAPTER):
            hidden = response_hidden(self.critic_body(), batch, frozen, self.critic_split)
        # the head runs in its weights' dtype, fp32 (it is tiny; bf16 values would be coarse), unless FSDP2's bf16
        # policy gathers every weight in bf16
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)

    def forward(
        self, prompt_ids, prompt_mask, response_ids, mask, with_entropy: bool = False, ptx: dict | None = None,
        policy_frozen=None, critic_frozen=None,
    ):  # fmt: skip
        """Log-probs, values (None without critic), entropy (None unless asked) and the PPO-ptx loss sum and
        token count (None without ``ptx``, a batch of SFT inputs)."""
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids, "mask": mask}
        logprobs, entropy = self.policy_forward(batch, with_entropy, policy_frozen)
        values = self.values(batch, critic_frozen)
        ptx_sum = ptx_tokens = None
        if ptx is not None:
            with self.adapter(POLICY_ADAPTER):
                ptx_sum, ptx_tokens, _ = response_token_loss(self.policy, **ptx)
        return logprobs, values, entropy, ptx_sum, ptx_tokens


# ----------------------------------------------------------------------------- the networks of a run


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
    critic_on_reward_base: bool = False  # the critic reads the reward model's base (critic_init: reward)

    def critic_frozen(self, policy_frozen, reward_frozen):
        """The frozen activations the critic starts from: those of the base it sits on."""
        return reward_frozen if self.critic_on_reward_base else policy_frozen

    def trainable_names(self) -> tuple[list[str], list[str]]:
        """Names of the trainable parameters of the policy and of the critic."""
        policy, critic = [], []
        for name, p in self.actor_critic.named_parameters():
            if not p.requires_grad:
                continue
            is_critic = name.startswith(("value_head.", "critic_backbone.")) or f".{CRITIC_ADAPTER}." in name
            (critic if is_critic else policy).append(name)
        return policy, critic

    @contextlib.contextmanager
    def reference_active(self):
        """The reference: a frozen copy, or with LoRA the policy's base with its adapters disabled."""
        if self.reference is not None:
            yield self.reference
            return
        policy = self.actor_critic.policy
        try:
            with policy.disable_adapter():
                yield policy
        finally:
            self.actor_critic.restore_trainable()

    @contextlib.contextmanager
    def reward_model_active(self):
        """With LoRA and critic_init=reward, the reward model is its base with the critic adapter disabled."""
        if self.reward_base_peft is None:
            yield self.reward_model
            return
        try:
            with self.reward_base_peft.disable_adapter():
                yield self.reward_model
        finally:
            self.actor_critic.restore_trainable()


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _copy_sharing(model: torch.nn.Module, shared: list[torch.nn.Parameter]) -> torch.nn.Module:
    """A deep copy of ``model`` in which the ``shared`` parameters are the original tensors."""
    return copy.deepcopy(model, {id(p): p for p in shared})


def _copy_frozen_below(model: torch.nn.Module, frozen: list[torch.nn.Parameter], share: bool) -> torch.nn.Module:
    """A deep copy of ``model`` whose ``frozen`` parameters (the blocks below train_top_layers) do not train:
    the original tensors (``share``), or frozen copies of them (sharded runs: no tensor in two networks)."""
    frozen_ids = {id(p) for p in frozen}
    names = {n for n, p in model.named_parameters() if id(p) in frozen_ids}
    out = _copy_sharing(model, frozen if share else [])
    for name, p in out.named_parameters():
        p.requires_grad_(name not in names)
    return out


def _store_frozen_as(dtype: torch.dtype, module: torch.nn.Module) -> None:
    """Cast the frozen floating-point parameters of ``module`` to ``dtype`` in place."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            replace_data(p, p.data.to(dtype))
    release_checkpoint_file(module)  # else the fp32 pages of the file, read once, stay in memory


def value_head_from_reward(rm_head: torch.nn.Linear, mean: float, std: float) -> torch.nn.Linear:
    """A copy of the reward head rescaled to predict normalised scores: (w h + b - mean) / std."""
    head = torch.nn.Linear(rm_head.in_features, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(rm_head.weight.float() / std)
        bias = rm_head.bias.float() if rm_head.bias is not None else torch.zeros(1)
        head.bias.copy_((bias - mean) / std)
    return head


def load_policy(cfg: PPOConfig, tokenizer) -> torch.nn.Module:
    """The SFT policy in fp32 (dropout off), with the "policy" adapter when LoRA is on (on the top blocks only with
    train_top_layers)."""
    policy = load_causal_lm(model_path_of(cfg.policy_model), tokenizer, dtype=torch.float32)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora, adapter_name=POLICY_ADAPTER, top_layers=cfg.train_top_layers)
    return policy


def build_networks(cfg: PPOConfig, device, sharded: bool = False) -> Networks:
    """Load the SFT policy, the reference, the reward model and (PPO) the critic (see the module docstring).
    ``sharded``: the trainer will shard them (FSDP2): no tensor shared between networks, no frozen-block cache."""
    from ..reward import load_reward_model, reads_policy_vocabulary, shares_tokens

    with_critic = cfg.algorithm == "ppo"
    critic_from_reward = with_critic and cfg.critic_init == "reward"
    policy_path = model_path_of(cfg.policy_model)
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    # Any sequence-classification reward model (a folder, a run folder meaning its final/, a hub id).
    rm, rm_tokenizer, rm_stats = load_reward_model(cfg.reward_model, torch.float32)
    disable_dropout(rm)
    same_vocab = reads_policy_vocabulary(rm_tokenizer, tokenizer)
    # The fast path hands the reward model the policy's token ids; otherwise the text is re-encoded in its layout.
    reads_policy_ids = shares_tokens(rm, rm_tokenizer, tokenizer)
    if critic_from_reward and not same_vocab:
        raise ValueError(
            f"critic_init: reward needs the reward model ({cfg.reward_model}) to share the policy's vocabulary "
            "(the critic reads the policy's tokens); use critic_init: policy"
        )
    if critic_from_reward and rm.lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        rm_pad = rm.lm.config.pad_token_id  # the reward model still reads its own text as before
        sync_model_with_tokenizer(rm.lm, tokenizer)  # the policy's pad row, which the critic reads (masked)
        rm.lm.config.pad_token_id = rm_pad

    policy = load_policy(cfg, tokenizer)
    lora, top = cfg.lora.enabled, cfg.train_top_layers
    reward_base_peft = critic_backbone = None
    if not lora:
        # With train_top_layers the frozen lower blocks are one set of tensors: the reference shares
        # the policy's, the critic shares the reward model's (deepcopy with those tensors memoised).
        train_only_top_layers(policy, top)
        reference = _freeze(_copy_frozen_below(policy, parameters_below_top_layers(policy, top), share=not sharded))
        layout = "full fine-tuning: policy, frozen reference copy, frozen reward model"
        if with_critic:
            source = rm.lm if critic_from_reward else policy
            critic_backbone = backbone_and_head(_copy_frozen_below(source, parameters_below_top_layers(source, top), share=not sharded))[0]
            layout = "full fine-tuning: policy, frozen reference copy, critic, frozen reward model (4 networks)"
        if top:
            layout += f"; only the top {top} blocks train" + ("" if sharded else ", the blocks below are shared by policy and reference" + (
                ", critic and reward model" if with_critic else ""))  # fmt: skip
    else:  # with train_top_layers, adapters on the top blocks only
        reference = None
        layout = "LoRA: SFT base with adapter 'policy' (reference = adapter disabled) + frozen reward model (2 base networks)"
        if with_critic and cfg.critic_init == "policy":
            policy.add_adapter(CRITIC_ADAPTER, lora_config(cfg.lora, model=policy, top_layers=top))
            policy.set_adapter(POLICY_ADAPTER)
            layout = (
                "LoRA: SFT base with adapters 'policy' and 'critic' (reference = adapters disabled) + "
                "separate frozen reward model (2 base networks)"
            )
        elif with_critic:
            # task_type None: a plain PeftModel (a sequence classifier is no causal LM); the critic reads its body.
            # Sharded: on its own copy of the reward model's base (the reward model stays whole, in fp32).
            critic_base = apply_lora(copy.deepcopy(rm.lm) if sharded else rm.lm, cfg.lora, adapter_name=CRITIC_ADAPTER, task_type=None, top_layers=top)
            reward_base_peft = None if sharded else critic_base
            critic_backbone = backbone_and_head(critic_base)[0]
            layout = (
                "LoRA: SFT base with adapter 'policy' (reference = adapter disabled) + reward-model base with "
                + ("adapter 'critic' + the reward model (3 base networks)" if sharded else "adapter 'critic' (reward model = adapter disabled) (2 base networks)")
            )
        if top:
            layout += f"; adapters on the top {top} blocks only"
    if sharded:
        layout += "; sharded (FSDP2): no tensor shared between networks, the reward model whole on each process"
    _freeze(rm)  # the reward model (and, with LoRA, its base) is frozen; the critic adapter is re-enabled below

    value_head = None
    if critic_from_reward:
        value_head = value_head_from_reward(rm.head, float(rm_stats.get("mean", 0.0)), float(rm_stats.get("std", 1.0)))
    elif with_critic:
        hidden = policy.config.hidden_size
        value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(value_head.bias)

    # The frozen blocks below the top `top` ones compute the same for every network on their base and
    # for every epoch: with cache_frozen_activations their output is computed once per rollout.
    policy_split = reward_split = 0
    if top and cfg.cache_frozen_activations and sharded:
        log.info("cache_frozen_activations is off under FSDP2: the cache assumes every network's frozen blocks whole on each process")
    elif top and cfg.cache_frozen_activations:
        policy_split = len(transformer_blocks(policy)) - top
        reward_split = len(transformer_blocks(rm.lm)) - top if critic_from_reward else 0
        layout += "; the output of the frozen blocks below is computed once per rollout"
    critic_split = reward_split if critic_from_reward else policy_split
    support = sampling_support(policy.get_output_embeddings().weight.shape[0], len(tokenizer), tokenizer.pad_token_id)
    actor_critic = ActorCritic(
        policy, critic_backbone, value_head, cfg.generation.temperature, shared=lora and with_critic and cfg.critic_init == "policy",
        policy_split=policy_split, critic_split=critic_split, support=support,
    )  # fmt: skip
    # trainable: the policy and critic (full, or their top blocks), or the adapters + value head (LoRA)
    for name, p in actor_critic.named_parameters():
        if lora:
            p.requires_grad_(".lora_" in name or name.startswith("value_head."))
        elif not top:
            p.requires_grad_(True)
    if value_head is not None:
        value_head.requires_grad_(True)
    if lora and cfg.lora.dropout:
        log.info("lora.dropout %.2f is switched off: the policy gradient needs deterministic log-probs", cfg.lora.dropout)
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
        # its base) keeps the fp32 embeddings and norms its reward_stats were measured with (in bf16 the
        # residual stream, and the normalised scores, would drift from the saved mean); its frozen matrices
        # go to bf16 only if it is read under bf16 autocast anyway (measured in bf16): the same scores.
        _store_frozen_as(torch.bfloat16, actor_critic.policy)
        if rm_stats.get("precision") == "bf16" and not sharded:
            store_frozen_linear_weights_as(rm.lm, torch.bfloat16)
    actor_critic.to(device)
    if reference is not None:
        reference.to(device)
    rm.to(device)
    return Networks(
        actor_critic, reference, rm, reward_base_peft, tokenizer, rm_tokenizer, rm_stats, reads_policy_ids, layout, reward_split,
        critic_from_reward,
    )
