"""Step 3: a policy learned from the reward model with a KL penalty toward the SFT policy, or directly from the
comparisons.

`run_ppo(cfg)` runs the online method `cfg.algorithm` picks: PPO (`ppo.py`), RLOO (`rloo.py`) or GRPO / Dr. GRPO
(`grpo.py`), on the shared parts: `math.py` (pure maths), `networks.py` (which networks play which role),
`rollout.py` (one batch of experience), `frozen_cache.py` (`train_top_layers`), `trainer.py` (the loop).
`dpo.run_dpo(cfg)` runs DPO / IPO offline (`dpo.py`, its losses in `preference_math.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import PPOConfig
from ..training import RunDir
from .grpo import GRPOTrainer
from .ppo import PPOTrainer
from .rloo import RLOOTrainer
from .trainer import OnlineTrainer

__all__ = ["TRAINERS", "GRPOTrainer", "OnlineTrainer", "PPOTrainer", "RLOOTrainer", "make_trainer", "run_ppo"]

log = logging.getLogger("rlhfkit.rl")

TRAINERS: dict[str, type[OnlineTrainer]] = {"ppo": PPOTrainer, "rloo": RLOOTrainer, "grpo": GRPOTrainer}


def make_trainer(cfg: PPOConfig) -> OnlineTrainer:
    """The trainer of `cfg.algorithm`."""
    return TRAINERS[cfg.algorithm](cfg)


def run_ppo(cfg: PPOConfig, stop_after: int | None = None) -> Path:
    """Run (or resume) the online method `cfg.algorithm` (ppo, rloo, grpo); returns final/ when done (the run
    folder if stopped early by `stop_after`)."""
    run = RunDir(cfg.output_dir)
    if run.is_done():
        log.info("%s is complete; nothing to do", run.final)
        return run.final
    return make_trainer(cfg).train(stop_after=stop_after)
