"""With `train_top_layers`: the output of the frozen lower blocks, computed once per rollout.

The blocks below the top N are frozen and carry no adapter, so their output is the same for every network
on their base (policy and reference; reward model and critic) and for every training epoch. Computed once
per rollout, it saves their forward passes in every later pass and all their backward passes. A body that
does more than embed, run its blocks and normalise (e.g. scales its embeddings) would change the numbers:
the first rollout checks the cached path against the whole network and switches the cache off on a mismatch.
"""

from __future__ import annotations

import logging

import torch

from ..models import backbone_and_head
from .networks import POLICY_ADAPTER, Networks, frozen_hidden, model_inputs, policy_logprobs, reward_scores

log = logging.getLogger("rlhfkit.rl")


class FrozenCache:
    def __init__(self, nets: Networks, accelerator):
        self.nets, self.accelerator = nets, accelerator
        self.checked = False

    @property
    def enabled(self) -> bool:
        return bool(self.nets.actor_critic.policy_split or self.nets.reward_split)

    @torch.no_grad()
    def compute(self, samples, micro_batches: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(policy_frozen, reward_frozen)``: the frozen blocks' output on prompt + response, ``(B, P + T, H)``, of the
        policy's base and of the reward model's base (None where nothing is cached)."""
        ac, nets = self.nets.actor_critic, self.nets
        if not self.enabled:
            return None, None
        (B, P), T = samples.prompt_ids.shape, samples.response_ids.shape[1]
        bases = [(backbone_and_head(ac.policy)[0], ac.policy_split), (backbone_and_head(nets.reward_model.lm)[0], nets.reward_split)]
        out: list[torch.Tensor | None] = [None, None]
        with self.accelerator.autocast():
            for rows in micro_batches:
                micro = samples.micro(rows)  # trimmed: its columns are [P - P', P + T') of the rollout's
                columns = slice(P - micro["prompt_ids"].shape[1], P + micro["mask"].shape[1])
                for i, (backbone, split) in enumerate(bases):
                    if split:
                        hidden = frozen_hidden(backbone, model_inputs(micro), split)
                        if out[i] is None:
                            out[i] = hidden.new_zeros(B, P + T, hidden.shape[-1])
                        out[i][rows, columns] = hidden
        if not self.checked and not self._same_as_whole_network(samples, micro_batches[0], *out):
            return None, None
        return out[0], out[1]

    def _same_as_whole_network(self, samples, rows: torch.Tensor, policy_frozen, reward_frozen) -> bool:
        """Running the upper blocks from the frozen output must give what the whole network gives; if not, the
        cache is switched off for the run (every pass then runs the whole network). Checked on ``rows``, a
        micro-batch the cache was computed on: the same rows and padding, so in bf16 too the two paths run the
        same operations on the same shapes (another grouping would differ by bf16 rounding, ~0.1 in a log-prob)."""
        self.checked = True
        ac, nets = self.nets.actor_critic, self.nets
        frozen = {name: t for name, t in (("policy_frozen", policy_frozen), ("reward_frozen", reward_frozen)) if t is not None}
        micro = samples.micro(rows, **frozen)
        pairs = []
        with self.accelerator.autocast():
            if ac.policy_split:
                with ac.adapter(POLICY_ADAPTER):
                    pairs.append((policy_logprobs(ac.policy, micro, ac.temperature, frozen=micro["policy_frozen"], split=ac.policy_split, support=ac.support)[0],
                                  policy_logprobs(ac.policy, micro, ac.temperature, support=ac.support)[0]))  # fmt: skip
            if nets.reward_split:
                with nets.reward_model_active() as rm:
                    pairs.append((reward_scores(rm, micro, micro["reward_frozen"], nets.reward_split), reward_scores(rm, micro)))
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
                return False
        return True
