"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"), no critic.

One iteration (`RLOOTrainer.iteration`):

1. **rollout**: k >= 2 responses to each prompt (`samples_per_prompt`), cut after their first EOS.
2. **experience**: reward-model scores (normalised, clipped, missing-EOS penalty as in PPO), the rollout
   policy's and the reference's log-probs (`rlhfkit.rl.rollout`).
3. **reward**: one per response, R_i = score_i - beta * sum_t kl_t (the KL of the whole response toward the SFT
   policy, as in the paper; with `kl_in: loss` the KL enters the loss instead, as GRPO's k3).
4. **advantage**: A_i = R_i - mean of the other k - 1 rewards to the same prompt (`rloo_advantages`), the
   same on every token of response i.
5. **optimise**: `ppo_epochs` passes over minibatches of the REINFORCE loss -A_i log pi(y_i), averaged over
   the minibatch's tokens. With `ppo_epochs: 1` and one minibatch this is the paper's on-policy RLOO (the
   ratio is 1); more passes use PPO's clipped ratio (`clip_range`) to stay near the rollout policy, as TRL does.
6. **beta**: the adaptive KL controller, as in PPO.
"""

from __future__ import annotations

from .math import per_token, rloo_advantages, rloo_baseline, token_weights
from .trainer import OnlineTrainer, PhaseTimer


class RLOOTrainer(OnlineTrainer):
    def iteration(self, it: int) -> dict[str, float]:
        """One RLOO iteration, in the order of the algorithm (module docstring)."""
        self.iteration_index = it
        beta, timer = self.kl_ctl.value, PhaseTimer(self.accelerator.device)
        with timer("generation"):
            samples = self.sample(self.plan.step(it).micro_batches[0])  # 1. k responses per prompt
        with timer("scoring"):
            rollout = self.experience(samples)  # 2. scores, rollout-policy and reference log-probs
            rewards = self.sequence_rewards(rollout, beta)  # 3. R_i = score_i - beta * KL_i
            advantages = rloo_advantages(rewards, self.k)  # 4. R_i - mean_{j != i} R_j
        with timer("training"):  # 5. REINFORCE (clipped ratio after the first pass), token mean
            weights, units = token_weights(rollout.mask, "token")
            targets = {"advantages": per_token(advantages, rollout.mask), "weights": weights, "units": units}
            stats = self.optimise(rollout, targets, units, self.policy_gradient_loss)

        self.rollout_stats(rollout, stats)
        stats.add("reward", rewards.mean(), len(rollout))
        stats.add("baseline", rloo_baseline(rewards, self.k).mean(), len(rollout))
        stats.add("advantage_abs", advantages.abs().mean(), len(rollout))
        self.last_rollout, self.last_targets = rollout, {"rewards": rewards, "advantages": advantages}
        return self.metrics(stats, timer, beta)  # 6. beta toward the target KL
