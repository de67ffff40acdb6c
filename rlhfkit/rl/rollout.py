"""One iteration's experience, built once: sampled responses (`Samples`), then their reward-model scores,
the rollout policy's and the reference's log-probs, the critic's values (PPO) and the per-token KL
(`Rollout`). Both are frozen values: an algorithm reads them and computes its own targets (GAE for PPO,
group baselines for RLOO and GRPO); nothing fills them in later.

Every pass over a rollout (frozen blocks, reward model, log-probs, values) runs on the micro-batches the
first training epoch will use, in its order (`micro_batches`), so the first minibatch trains on exactly
the rows, padding and shapes its old log-probs were computed with: its ratio is exactly 1, in bf16 too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch

from ..config import PPOConfig
from ..generate import sample_ids
from ..tokens import encode_prompt, pad
from ..training import check_finite
from .math import first_eos_mask, kl_penalty
from .networks import Networks, model_inputs, policy_logprobs, reward_scores

log = logging.getLogger("rlhfkit.rl")


@dataclass(frozen=True)
class Samples:
    """Sampled responses on this process, ``k`` per prompt (a prompt's responses are consecutive rows)."""

    messages: list  # one conversation per row (repeated k times)
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the first EOS
    mask: torch.Tensor  # (B, T) bool: up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def micro(self, rows: torch.Tensor | slice, **per_row: torch.Tensor) -> dict:
        """Rows ``rows`` of every tensor (and of ``per_row`` ones, e.g. advantages), trimmed: no all-padding
        prompt columns, no response columns past the longest response."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {name: value[rows] for name, value in {**out, **per_row}.items() if isinstance(value, torch.Tensor)}
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

    def parts(self) -> dict:
        """The fields of these samples, to build a `Rollout` from."""
        return {f.name: getattr(self, f.name) for f in fields(Samples)}


@dataclass(frozen=True)
class Rollout(Samples):
    """Samples with everything computed once about them (no grad). Per-token tensors are ``(B, T)``, 0 on padding."""

    rm_scores: torch.Tensor  # (B,) normalised reward-model scores
    scores: torch.Tensor  # (B,) after clipping and the missing-EOS penalty
    old_logprobs: torch.Tensor  # the rollout policy's
    ref_logprobs: torch.Tensor  # the reference's (the SFT policy)
    entropy: torch.Tensor  # the rollout policy's, per token
    values: torch.Tensor | None  # the critic's (PPO only)
    kl: torch.Tensor  # per token, the `kl_estimator` of the reward
    kl_k1: torch.Tensor  # per token, k1 (logged, fed to the adaptive controller)
    # (B, P + T, H): output of the frozen lower blocks of the policy's base and of the reward model's base
    policy_frozen: torch.Tensor | None = None
    reward_frozen: torch.Tensor | None = None


# ----------------------------------------------------------------------------- 1. sampling


def cut_after_first_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled ids -> (ids with pad after the first EOS, mask, has_eos), trimmed to the longest response."""
    mask, has_eos = first_eos_mask(responses, eos_id, pad_id)
    mask[:, 0] = True  # the first sampled token always belongs to the response (even if it is the pad id)
    responses = responses.masked_fill(~mask, pad_id)
    T = int(mask.sum(1).max())
    return responses[:, :T], mask[:, :T], has_eos


@torch.no_grad()
def sample(actor_critic, tokenizer, messages: list, gen, k: int, device, autocast) -> Samples:
    """``k`` responses to each prompt from the policy (left-padded prompts; sampled ``gen.batch_size`` prompts
    at a time), cut after their first EOS."""
    ids = [encode_prompt(tokenizer, m, gen.max_prompt_length, gen.system_prompt) for m in messages]
    prompt_ids = pad(ids, tokenizer.pad_token_id, side="left").to(device)
    prompt_mask = pad([[1] * len(i) for i in ids], 0, side="left").to(device)
    chunks = []
    actor_critic.eval()
    with autocast:
        for start in range(0, len(ids), gen.batch_size):
            p_ids, p_mask = prompt_ids[start : start + gen.batch_size], prompt_mask[start : start + gen.batch_size]
            keep_from = int(p_mask.any(0).long().argmax())
            out = sample_ids(actor_critic.policy, p_ids[:, keep_from:], p_mask[:, keep_from:], gen, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, num_samples=k, num_tokens=len(tokenizer))  # fmt: skip
            chunks.append(torch.nn.functional.pad(out, (0, gen.max_new_tokens - out.shape[1]), value=tokenizer.pad_token_id))
    actor_critic.train()
    responses, mask, has_eos = cut_after_first_eos(torch.cat(chunks), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return Samples([m for m in messages for _ in range(k)], prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0),
                   responses, mask, has_eos)  # fmt: skip


# ----------------------------------------------------------------------------- 2. scores


def penalise(rm_scores: torch.Tensor, has_eos: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """Optional clipping of the normalised scores, then the missing-EOS penalty (`missing_eos`)."""
    scores = rm_scores.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip is not None else rm_scores.clone()
    missing = ~has_eos
    if cfg.missing_eos == "replace":
        return torch.where(missing, torch.full_like(scores, -cfg.missing_eos_penalty), scores)
    if cfg.missing_eos == "subtract":
        return scores - missing.float() * cfg.missing_eos_penalty
    return scores


def _with_system(messages: list, system_prompt: str | None) -> list:
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


class Experience:
    """Builds the `Rollout` of some `Samples`: scores, log-probs, values, KL (steps 2-3 of every algorithm)."""

    def __init__(self, cfg: PPOConfig, nets: Networks, accelerator):
        self.cfg, self.nets, self.accelerator = cfg, nets, accelerator
        self._warned_missing_eos = False

    def __call__(self, samples: Samples, micro_batches: list, frozen: tuple, step: int) -> Rollout:
        policy_frozen, reward_frozen = frozen
        rm_scores, scores = self.score(samples, micro_batches, reward_frozen, step)
        old, ref, entropy, values = self.logprobs_and_values(samples, micro_batches, policy_frozen, reward_frozen)
        kl = torch.where(samples.mask, kl_penalty(old, ref, self.cfg.kl_estimator), 0.0)
        kl_k1 = torch.where(samples.mask, kl_penalty(old, ref, "k1"), 0.0)
        return Rollout(**samples.parts(), rm_scores=rm_scores, scores=scores, old_logprobs=old, ref_logprobs=ref, entropy=entropy,
                       values=values, kl=kl, kl_k1=kl_k1, policy_frozen=policy_frozen, reward_frozen=reward_frozen)  # fmt: skip

    @torch.no_grad()
    def score(self, samples: Samples, micro_batches: list, reward_frozen=None, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward-model scores normalised with step 2's statistics, and the scores after clipping and the
        missing-EOS penalty. The reward model scores as its statistics were measured: fp32 weights, bf16
        autocast only if step 2 ran in bf16 (`reward_stats` "precision"), whatever this run's precision."""
        cfg, nets, device = self.cfg, self.nets, self.accelerator.device
        rm_precision = nets.rm_stats.get("precision", "fp32")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=rm_precision == "bf16")
        with autocast, nets.reward_model_active() as rm:
            if nets.same_vocab:  # the policy's token ids as they are
                raw = torch.zeros(len(samples), device=device)
                # the frozen blocks' cached output was computed in this run's precision: reused only if it is the reward model's
                split = nets.reward_split if rm_precision == cfg.precision and reward_frozen is not None else 0
                for rows in micro_batches:
                    micro = samples.micro(rows, **({"reward_frozen": reward_frozen} if split else {}))
                    raw[rows] = reward_scores(rm, micro, micro.get("reward_frozen"), split)
            else:  # another vocabulary: the text, re-encoded with the reward model's own tokenizer and chat template
                from ..reward import score

                tok = nets.tokenizer
                texts = tok.batch_decode(samples.response_ids.masked_fill(~samples.mask, tok.pad_token_id), skip_special_tokens=True)
                messages = [_with_system(m, cfg.generation.system_prompt) for m in samples.messages]
                raw = torch.tensor(
                    score(rm, nets.rm_tokenizer, messages, [t.strip() for t in texts], cfg.batch_size, normalise=False,
                          complete=samples.has_eos.tolist(),  # a response cut without EOS stays cut
                          max_length=cfg.reward_max_length, precision=rm_precision),
                    dtype=torch.float32, device=device,
                )  # fmt: skip
        rm_scores = (raw - float(nets.rm_stats.get("mean", 0.0))) / (float(nets.rm_stats.get("std", 1.0)) or 1.0)
        check_finite("reward-model score", rm_scores, step)
        self._warn_if_stopping_does_not_pay(rm_scores, samples.has_eos)
        return rm_scores, penalise(rm_scores, samples.has_eos, cfg)

    def _warn_if_stopping_does_not_pay(self, rm_scores: torch.Tensor, has_eos: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.missing_eos != "replace" or self._warned_missing_eos or has_eos.all() or not has_eos.any():
            return
        if rm_scores[has_eos].mean().item() < -cfg.missing_eos_penalty:
            self._warned_missing_eos = True
            log.warning(
                "complete responses score %.2f on average, below the %.2f that replaces the score of a response "
                "without EOS: the policy can gain by not stopping. The reward model's normalisation statistics "
                "do not fit this policy's responses; consider missing_eos: subtract or a larger missing_eos_penalty",
                rm_scores[has_eos].mean().item(), -cfg.missing_eos_penalty,
            )  # fmt: skip

    @torch.no_grad()
    def logprobs_and_values(self, samples: Samples, micro_batches: list, policy_frozen=None, reward_frozen=None):
        """Rollout-policy log-probs, entropy and values (None without critic), and reference log-probs."""
        nets, acc = self.nets, self.accelerator
        ac = nets.actor_critic
        B, T = samples.response_ids.shape
        old, ent, ref, values = (torch.zeros(B, T, device=acc.device) for _ in range(4))
        extra = {name: t for name, t in (("policy_frozen", policy_frozen), ("reward_frozen", reward_frozen)) if t is not None}
        with acc.autocast():
            for rows in micro_batches:
                micro = samples.micro(rows, **extra)
                t = micro["mask"].shape[1]
                lp, v, e, _, _ = ac(**model_inputs(micro), with_entropy=True, policy_frozen=micro.get("policy_frozen"),
                                    critic_frozen=nets.critic_frozen(micro.get("policy_frozen"), micro.get("reward_frozen")))  # fmt: skip
                old[rows, :t], ent[rows, :t] = lp, e
                if v is not None:
                    values[rows, :t] = v
                with nets.reference_active() as reference:
                    ref[rows, :t] = policy_logprobs(reference, model_inputs(micro), ac.temperature, frozen=micro.get("policy_frozen"),
                                                    split=ac.policy_split, support=ac.support)[0]  # fmt: skip
        # padding holds the pad id, outside the sampling support (log-prob -inf): stored as 0
        old, ref = torch.where(samples.mask, old, 0.0), torch.where(samples.mask, ref, 0.0)
        return old, ref, ent, values if ac.has_critic else None
