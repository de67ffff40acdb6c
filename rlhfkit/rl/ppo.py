"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): a critic,
per-token KL rewards, GAE and epochs of clipped updates.

One iteration (`PPOTrainer.iteration`) is, in order:

1. **rollout**: a batch of prompts (left-padded) and one sampled response each (or `samples_per_prompt`),
   cut after their first EOS.
2. **experience**: the frozen reward model's score of each response, normalised with step 2's statistics,
   optionally clipped, a response without EOS penalised; the rollout policy's and the reference's log-probs
   and the critic's values, once per rollout (`rlhfkit.rl.rollout`).
3. **KL rewards**: per-token KL toward the frozen reference, tuned policy first (`kl_t = log pi(y_t) -
   log pi_ref(y_t)`), reward `-beta * kl_t` on every token plus the score on the last one (`rewards_with_kl`).
4. **advantages**: GAE over response tokens, returns = advantages + values, advantages whitened over the
   rollout's valid tokens (all processes).
5. **optimise**: `ppo_epochs` passes over shuffled minibatches: clipped policy loss, clipped value loss
   (`vf_coef`), optional entropy bonus and PPO-ptx loss, gradient clipping, one AdamW step.
6. **beta**: the adaptive KL controller moves beta toward `target_kl` (or beta stays fixed).

The maths are the pure functions of `rlhfkit.rl.math`; the networks and their memory layouts are in
`rlhfkit.rl.networks`; the shared loop (resume, logging, samples, NaN guard) in `rlhfkit.rl.trainer`.
"""

from __future__ import annotations

import torch

from ..training import check_finite
from .math import explained_variance, gae, masked_mean, masked_whiten, policy_loss, rewards_with_kl, value_loss
from .rollout import Rollout
from .trainer import Means, OnlineTrainer, PhaseTimer


class PPOTrainer(OnlineTrainer):
    def iteration(self, it: int) -> dict[str, float]:
        """One PPO iteration, in the order of the algorithm (module docstring)."""
        self.iteration_index = it
        beta, timer = self.kl_ctl.value, PhaseTimer(self.accelerator.device)
        with timer("generation"):
            samples = self.sample(self.plan.step(it).micro_batches[0])  # 1. prompts -> responses, cut after the first EOS
        with timer("scoring"):
            rollout = self.experience(samples)  # 2. scores, old / reference log-probs, values: once per rollout
            rewards = self.kl_rewards(rollout, beta)  # 3. -beta * kl_t per token + score on the last token
            advantages, returns = self.advantages(rollout, rewards)  # 4. GAE, returns, whitening
        with timer("training"):  # 5. ppo_epochs x minibatches of clipped policy and value losses
            stats = self.optimise(rollout, {"advantages": advantages, "returns": returns}, rollout.mask.sum(1), self.loss)

        self.rollout_stats(rollout, stats)
        B, mask, non_score = len(rollout), rollout.mask, (rewards.sum(1) - rollout.scores)
        stats.add("non_score_reward", non_score.mean(), B)
        stats.add("total_reward", rewards.sum(1).mean(), B)
        stats.add("value_mean", rollout.values[mask].mean(), float(mask.sum()))
        stats.add("return_mean", returns[mask].mean(), float(mask.sum()))
        metrics = self.metrics(stats, timer, beta)  # 6. beta toward the target KL
        metrics["explained_variance"] = self.explained_variance(rollout, returns)
        self.last_rollout, self.last_targets = rollout, {"rewards": rewards, "advantages": advantages, "returns": returns}
        return metrics

    def kl_rewards(self, rollout: Rollout, beta: float) -> torch.Tensor:
        """Per-token reward -beta * kl_t, plus the score on the last token (no KL here with `kl_in: loss`)."""
        beta_in_reward = beta if self.cfg.kl_placement == "reward" else 0.0
        rewards, _ = rewards_with_kl(rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, rollout.mask, beta_in_reward, self.cfg.kl_estimator)
        check_finite("reward", rewards[rollout.mask], self.iteration_index + 1)
        return rewards

    def advantages(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over response tokens; returns = advantages + values; advantages whitened over all processes."""
        advantages, returns = gae(rewards, rollout.values, rollout.mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = self._whiten(advantages, rollout.mask)
        return advantages, returns

    def loss(self, micro: dict, outputs, epoch: int, stats: Means) -> torch.Tensor:
        """policy_loss + vf_coef * value_loss - entropy_coef * entropy (token means), times the micro-batch's tokens."""
        cfg, step = self.cfg, self.iteration_index + 1
        logprobs, values, entropy, _, _ = outputs
        mask = micro["mask"]
        n_tokens = float(mask.sum())
        pg_loss, pg_stats = policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], mask, cfg.clip_range)
        vf_loss, vf_stats = value_loss(values, micro["values"], micro["returns"], mask, cfg.value_clip_range)
        loss = pg_loss + cfg.vf_coef * vf_loss
        if entropy is not None:
            entropy_mean = masked_mean(entropy, mask)
            loss = loss - cfg.entropy_coef * entropy_mean
            stats.add("entropy_train", entropy_mean.item(), n_tokens)
        check_finite("policy loss", pg_loss.detach(), step)
        check_finite("value loss", vf_loss.detach(), step)
        for name, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("policy_clipfrac", pg_stats["clipfrac"]),
                            ("value_clipfrac", vf_stats["clipfrac"]), ("approx_kl", pg_stats["approx_kl"]),
                            (f"approx_kl_epoch{epoch + 1}", pg_stats["approx_kl"]), ("ratio", pg_stats["ratio_mean"])):  # fmt: skip
            stats.add(name, value.item(), n_tokens)
        return loss * n_tokens + self.kl_in_loss(logprobs, micro, mask.float(), stats)

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

    def explained_variance(self, rollout: Rollout, returns: torch.Tensor) -> float:
        if self.accelerator.num_processes == 1:
            return float(explained_variance(rollout.values, returns, rollout.mask))
        _, _, var_returns = self._global_moments(returns, rollout.mask)
        _, _, var_residual = self._global_moments(returns - rollout.values, rollout.mask)
        return 1.0 - var_residual / var_returns if var_returns > 0 else float("nan")
