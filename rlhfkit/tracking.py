"""Metrics through accelerate's tracker API: `metrics.jsonl` (a tracker of ours) and TensorBoard always,
plus the trackers named in the config's `report_to` (wandb, trackio, mlflow, ...), set up to work offline.

`make_accelerator` hands `trackers(cfg)` to the Accelerator as `log_with`; `MetricsLogger` then calls
`accelerator.init_trackers` and `accelerator.log` (on the main process only, as accelerate does). Each
metric goes to the trackers as "phase/name" (train/loss, eval/loss); metrics.jsonl keeps one line per
call, {"step", "phase", "time", name: value, ...}, which the report and the tests read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, TensorBoardTracker

ALWAYS_ON = ("jsonl", "tensorboard")
PROJECT = "rlhfkit"  # project / experiment name in wandb, trackio, mlflow, ...


def check_report_to(names: list[str]) -> list[str]:
    """The config's `report_to`: names accelerate knows, whose package is installed."""
    from accelerate.utils import imports

    for name in names:
        if name in ALWAYS_ON:
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(n for n in LOGGER_TYPE_TO_CLASS if n != "tensorboard")
            raise ValueError(f"unknown tracker {name!r} (accelerate knows {known}; TensorBoard and metrics.jsonl are always on)")
        available = getattr(imports, f"is_{name}_available", None)  # None: a tracker registered with accelerate
        if available is not None and not available():
            raise ValueError(f"tracker {name!r} is not installed (pip install {name.replace('_', '-')})")
    return names


class JSONLTracker(GeneralTracker):
    """metrics.jsonl as an accelerate tracker: one JSON object per `log` call."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: dict, step: int | None = None, phase: str = "train", **kwargs):
        metrics = {k.removeprefix(f"{phase}/"): v for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "phase": phase, "time": time.time(), **metrics}) + "\n")

    def trim(self, last_step: int) -> None:
        """Resuming at `last_step`: the steps after it will be redone, so their old lines go."""
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= last_step]
            self.path.write_text("".join(l + "\n" for l in kept))


def trackers(output_dir: str | Path, report_to: list[str] = ()) -> list[GeneralTracker]:
    """Tracker objects for a run folder (nothing starts before `init_trackers`): metrics.jsonl,
    TensorBoard in tb/, then each `report_to` tracker, offline unless its own settings say otherwise."""
    run = Path(output_dir)
    out = [JSONLTracker(run / "metrics.jsonl"), TensorBoardTracker("tb", run)]
    for name in dict.fromkeys(report_to):
        if name in ALWAYS_ON:
            continue
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "wandb":  # W&B offline (sync later with `wandb sync`) unless WANDB_MODE says otherwise
            out.append(cls(PROJECT, name=run.name, dir=str(run), mode=os.environ.get("WANDB_MODE", "offline")))
        elif name == "mlflow":
            out.append(cls(PROJECT, logging_dir=str(run / "mlruns"), run_name=run.name))
        elif cls.requires_logging_directory:
            out.append(cls(PROJECT, str(run / name)))
        else:
            out.append(cls(PROJECT))
    return out


class MetricsLogger:
    """Metrics to every tracker of the run, on the main process only. With `accelerator` (made by
    `make_accelerator`) through its trackers; without one, to metrics.jsonl and TensorBoard."""

    def __init__(self, run, enabled: bool = True, resume_step: int | None = None, accelerator=None):
        self.enabled, self.accelerator = enabled, accelerator
        if not enabled:
            return
        own = trackers(run.path) if accelerator is None else [t for t in accelerator.log_with if isinstance(t, GeneralTracker)]
        for tracker in own:
            if isinstance(tracker, JSONLTracker) and resume_step is not None:
                tracker.trim(resume_step)
            if isinstance(tracker, TensorBoardTracker) and resume_step:
                tracker.init_kwargs["purge_step"] = resume_step + 1  # TensorBoard drops the redone steps too
        if accelerator is not None:
            if not accelerator.trackers:  # once per accelerator: a second init would log everything twice
                accelerator.init_trackers(PROJECT)
            self.trackers = accelerator.trackers
        else:
            self.trackers = own
            for tracker in own:
                tracker.start()

    def log(self, step: int, metrics: dict[str, float], phase: str = "train") -> None:
        if not self.enabled:
            return
        values = {f"{phase}/{k}": v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        if self.accelerator is not None:
            self.accelerator.log(values, step=step, log_kwargs={"jsonl": {"phase": phase}})
            return
        for tracker in self.trackers:
            tracker.log(values, step=step, **({"phase": phase} if isinstance(tracker, JSONLTracker) else {}))

    def close(self) -> None:
        # Not accelerator.end_training(): it also ends the process group, which the next step may need.
        if self.enabled:
            for tracker in self.trackers:
                tracker.finish()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
