"""Step 3 of the pipeline: learning a policy from the reward model (PPO) or directly from comparisons (DPO)."""
