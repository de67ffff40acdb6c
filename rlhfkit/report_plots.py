"""The report's training curves: matplotlib figures (Agg backend) as base64 PNGs, one figure per step."""

from __future__ import annotations

import base64
import io
import math

PPO_PANELS = [
    ("score", "reward-model score (normalised)"),
    ("kl", "KL from SFT (nats / response)"),
    ("beta", "KL coefficient beta"),
    ("response_length", "response length (tokens)"),
    ("eos_share", "responses ending with EOS"),
    ("entropy", "entropy (nats / token)"),
]
FIG_WIDTH = 11.7  # inches at 100 dpi: about the width of the page's main column
COLORS = {"train": "#1a5fb4", "eval": "#c64600", "extra": "#26734d", "target": "#777777"}


def _series(metrics: list[dict], key: str, phase: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for m in metrics:
        v = m.get(key)
        if m.get("phase", "train") == phase and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(m["step"])
            ys.append(v)
    return xs, ys


def _ema(ys: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for y in ys:
        acc = y if acc is None else alpha * y + (1 - alpha) * acc
        out.append(acc)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(panels: int, cols: int = 3):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = math.ceil(panels / cols)
    cols = min(cols, panels)
    # Every figure is as wide as the page column, so fonts come out the same size in all of them.
    fig = Figure(figsize=(FIG_WIDTH, 2.7 * rows if cols >= 3 else 3.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    return fig, axes[:panels]


def _plot_line(ax, xs, ys, color, label, smooth: bool = True) -> None:
    if not xs:
        return
    if len(xs) == 1:
        ax.plot(xs, ys, "o", color=color, label=label, markersize=5)
        return
    if smooth and len(xs) >= 12:
        ax.plot(xs, ys, color=color, alpha=0.28, linewidth=1)
        ax.plot(xs, _ema(ys, 2 / (1 + max(3, len(xs) // 10))), color=color, linewidth=1.8, label=label + " (smoothed)")
    else:
        ax.plot(xs, ys, color=color, linewidth=1.6, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)


def _train_eval_panels(metrics: list[dict], keys: list[tuple[str, str]], xlabel: str = "optimiser step") -> str | None:
    panels = [(k, t) for k, t in keys if _series(metrics, k, "train")[0] or _series(metrics, k, "eval")[0]]
    if not panels:
        return None
    fig, axes = _figure(len(panels), cols=len(panels))
    for ax, (key, title) in zip(axes, panels):
        _plot_line(ax, *_series(metrics, key, "train"), COLORS["train"], "train")
        ex, ey = _series(metrics, key, "eval")
        if ex:
            ax.plot(ex, ey, "o-", color=COLORS["eval"], label="held-out", linewidth=1.6, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def plot_sft(metrics: list[dict]) -> str | None:
    return _train_eval_panels(metrics, [("loss", "loss (nats / response token)"), ("token_accuracy", "next-token accuracy")])


def plot_reward(metrics: list[dict]) -> str | None:
    return _train_eval_panels(
        metrics, [("loss", "pairwise loss"), ("accuracy", "pairwise accuracy"), ("margin", "mean margin r_better - r_worse")]
    )


def plot_ppo(metrics: list[dict], config: dict) -> str | None:
    panels = [(k, t) for k, t in PPO_PANELS if _series(metrics, k, "train")[0]]
    if not panels:
        return None
    fig, axes = _figure(len(panels), cols=3)
    for ax, (key, title) in zip(axes, panels):
        xs, ys = _series(metrics, key, "train")
        _plot_line(ax, xs, ys, COLORS["train"], key)
        if key == "score":
            px, py = _series(metrics, "score_penalised", "train")
            if py and py != ys:
                _plot_line(ax, px, py, COLORS["extra"], "with missing-EOS penalty")
        if key == "kl" and config.get("adaptive_kl") and config.get("target_kl"):
            ax.axhline(config["target_kl"], color=COLORS["target"], linestyle="--", linewidth=1, label="target")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration", fontsize=8)
        if key == "eos_share":
            ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)
