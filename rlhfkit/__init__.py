"""rlhfkit: the whole RLHF pipeline (SFT, reward model, PPO, human feedback) for causal LMs."""

__version__ = "0.1.0"
