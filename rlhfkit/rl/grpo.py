"""GRPO: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath), no critic; and Dr. GRPO
(Liu et al. 2025, "Understanding R1-Zero-Like Training") with `grpo_variant: dr_grpo`.

One iteration (`GRPOTrainer.iteration`):

1. **rollout**: a group of k >= 2 responses to each prompt (`samples_per_prompt`), cut after their first EOS.
2. **experience**: reward-model scores (normalised, clipped, missing-EOS penalty as in PPO), the rollout
   policy's and the reference's log-probs (`rlhfkit.rl.rollout`).
3. **reward**: one per response: the score (the default `kl_in: loss` puts the KL in the loss, step 5); with
   `kl_in: reward`, score - beta * the response's summed per-token KL.
4. **advantage**: normalised within the group, A_i = (R_i - mean) / (std + eps); Dr. GRPO: A_i = R_i - mean
   (`grpo_advantages`); the same on every token of response i.
5. **optimise**: `ppo_epochs` passes over minibatches of the clipped surrogate with the KL term
   beta * k3(pi_theta, pi_ref) per token (`kl_in: loss`), GRPO: averaged per response (1/|o_i| sum_t), then over
   responses; Dr. GRPO: summed over tokens and divided by responses x max_new_tokens (no length normalisation).
6. **beta**: the adaptive KL controller, as in PPO (`adaptive_kl: false` keeps the paper's fixed beta).
"""

from __future__ import annotations

from .math import grpo_advantages, per_token, token_weights
from .trainer import OnlineTrainer, PhaseTimer


class GRPOTrainer(OnlineTrainer):
    def iteration(self, it: int) -> dict[str, float]:
        """One GRPO (or Dr. GRPO) iteration, in the order of the algorithm (module docstring)."""
        self.iteration_index = it
        dr_grpo = self.cfg.grpo_variant == "dr_grpo"
        beta, timer = self.kl_ctl.value, PhaseTimer(self.accelerator.device)
        with timer("generation"):
            samples = self.sample(self.plan.step(it).micro_batches[0])  # 1. a group of k responses per prompt
        with timer("scoring"):
            rollout = self.experience(samples)  # 2. scores, rollout-policy and reference log-probs
            rewards = self.sequence_rewards(rollout, beta)  # 3. R_i (the KL is in the loss by default)
            advantages = grpo_advantages(rewards, self.k, scale_by_std=not dr_grpo)  # 4. (R_i - mean) / std
        with timer("training"):  # 5. clipped surrogate + beta * k3, per-response mean (Dr. GRPO: constant)
            aggregation = "constant" if dr_grpo else "sequence"
            weights, units = token_weights(rollout.mask, aggregation, self.cfg.generation.max_new_tokens)
            targets = {"advantages": per_token(advantages, rollout.mask), "weights": weights, "units": units}
            stats = self.optimise(rollout, targets, units, self.policy_gradient_loss)

        self.rollout_stats(rollout, stats)
        stats.add("reward", rewards.mean(), len(rollout))
        stats.add("reward_std_in_group", rewards.view(-1, self.k).std(dim=1).mean(), len(rollout) // self.k)
        stats.add("advantage_abs", advantages.abs().mean(), len(rollout))
        self.last_rollout, self.last_targets = rollout, {"rewards": rewards, "advantages": advantages}
        return self.metrics(stats, timer, beta)  # 6. beta toward the target KL
