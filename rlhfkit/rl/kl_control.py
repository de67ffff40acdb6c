"""The KL coefficient beta: fixed, or adapted toward a target KL (Ziegler et al. 2019)."""

from __future__ import annotations


class FixedKLController:
    """Constant KL coefficient beta."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the signature matches ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a P-controller.

        error = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + error * n_steps / horizon)

    ``current_kl`` is the KL per RESPONSE (sum over its tokens of the k1 ``kl`` from
    ``rewards_with_kl``, averaged over the batch), in the same unit as ``target``
    (nats per response). ``n_steps`` is the number of responses (episodes) in the
    batch, as in the paper and TRL.

    ``state_dict()`` holds beta as a Python float, so ``load_state_dict`` restores it
    bit-exactly. Only beta is restored: ``target`` and ``horizon`` come from the
    (resumed) run's config, i.e. the constructor.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
