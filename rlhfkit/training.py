"""What every training step shares: the run folder, metrics, checkpoints, the data plan,
the optimiser and schedule, and the supervised training loop used by SFT and the reward model.

Run folder layout (`output_dir`):
    config.yaml              the resolved config
    metrics.jsonl            one JSON object per logged step (also in tb/ for TensorBoard, and in the
                             `report_to` trackers; see tracking.py)
    checkpoints/step-N/      accelerate state (model, optimiser, scheduler, RNG) + trainer_state.json
    final/                   the finished model (written last; its presence means the step is done)

Resuming: the data order is a pure function of (seed, epoch), so the position in the data is
just the optimiser step; a checkpoint stores that step and everything else accelerate saves.
Checkpoints are written to a temporary folder and renamed, so a kill during a save leaves the
previous checkpoint intact.

Multi-process (accelerate launch): every process builds the same plan and takes its own share
of each global batch. Each micro-batch loss is a *sum* divided by the global normaliser
(tokens, prompts...) times the number of processes, so after DDP (or FSDP2's reduce-scatter) averages
the gradients the update equals the single-process update on the same global batch. Under FSDP2
(distributed.py) the checkpoint's model and optimiser are sharded (a distributed checkpoint, one
file per process), written and read by the same save_state / load_state.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed as seed_everything  # noqa: F401 (random, numpy, torch, every GPU; the steps import it from here)
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate
from transformers.trainer_pt_utils import get_length_grouped_indices

from .allocator import allocator_in_use
from .config import TrainingSettings, save_config
from .distributed import enable_fsdp, parameter_bytes_per_process
from .tracking import MetricsLogger, read_metrics, trackers  # noqa: F401 (the steps import MetricsLogger, read_metrics from here)

log = logging.getLogger("rlhfkit.training")


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN/Inf; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------- run folder


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.metrics_file = self.path / "metrics.jsonl"

    def is_done(self) -> bool:
        return (self.final / "config.json").exists() or (self.final / "adapter_config.json").exists()

    def latest_checkpoint(self) -> Path | None:
        done = [p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_run_config(cfg, run: RunDir) -> None:
    save_config(cfg, run.path / "config.yaml")


def peak_memory_mb() -> float:
    """Peak memory so far: CUDA memory allocated on a GPU, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_finite(name: str, value: torch.Tensor | float, step: int) -> None:
    v = torch.as_tensor(value)
    if not torch.isfinite(v).all():
        raise NonFiniteError(
            f"{name} is {v.flatten()[~torch.isfinite(v.flatten())][0].item()} at step {step}; stopping. "
            "The last good checkpoint is kept; lower the learning rate or check the data, then re-run to resume."
        )


# ----------------------------------------------------------------------------- accelerate, optimiser


def make_accelerator(cfg: TrainingSettings) -> Accelerator:
    # cpu=True without a GPU: under `accelerate launch --multi_gpu --num_processes N` (torchrun) the
    # processes then form a gloo group (MULTI_CPU) instead of N independent single-process runs.
    from accelerate.state import AcceleratorState

    wanted = "bf16" if cfg.precision == "bf16" else "no"
    if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
        # One process may run several steps with different precisions (a notebook, the tests):
        # accelerate keeps its first choice in a singleton; reset it (the process group stays).
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=wanted,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
        log_with=trackers(cfg.output_dir, cfg.report_to),  # started by MetricsLogger
    )
    enable_fsdp(accelerator, cfg.precision)  # under an FSDP accelerate config (configs/accelerate/fsdp2.yaml)
    if accelerator.num_processes > 1:
        atexit.register(end_process_group)  # registered twice is harmless: the second call finds no group
    return accelerator


def end_process_group() -> None:
    """At exit, end the process group ourselves: a gloo group left to the interpreter's teardown can abort
    the process ("terminate called without an active exception") after all the work is done and saved.
    Not at the end of each step: the pipeline runs several steps in one process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def start_run(cfg: TrainingSettings) -> tuple[RunDir, Accelerator | None]:
    """What a training step does first: (run, None) if the run is complete (nothing to do); else (run, accelerator)
    with the seed set and the resolved config saved in the run folder."""
    run = RunDir(cfg.output_dir)
    if run.is_done():
        log.info("%s is complete; nothing to do", run.final)
        return run, None
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    if accelerator.is_main_process:
        save_run_config(cfg, run)
    return run, accelerator


def make_optimizer(model: torch.nn.Module, cfg: TrainingSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # The fused kernel (CPU and GPU) is several times faster than the default per-tensor loop,
    # which on CPU took as long as the forward and backward passes together.
    try:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingSettings, total_steps: int):
    """Linear warm-up then cosine decay to learning_rate * min_lr_ratio (transformers' schedule)."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(optimizer, warmup, total_steps, min_lr_rate=cfg.min_lr_ratio)


# ----------------------------------------------------------------------------- data plan


@dataclass
class GlobalBatch:
    """One optimiser step: this process's micro-batches and the loss normaliser over all processes."""

    micro_batches: list[list[Any]]
    total_weight: float


@dataclass
class DataPlan:
    """The order in which items are seen: a pure function of (seed, epoch), so resuming needs only the step."""

    items: Sequence[Any]
    batch_size: int
    grad_accum: int
    num_processes: int
    process_index: int
    seed: int
    weight: Callable[[Any], float] = lambda item: 1.0
    group: Callable[[list[Any]], list[Any]] | None = None  # e.g. packing: items -> rows
    length: Callable[[Any], int] | None = None  # set: group items of similar length (less padding)
    length_window: int = 32  # global batches per window sorted by length
    lengths: Sequence[int] | None = None  # or the lengths themselves (a dataset's column, numpy): no pass over the items
    _order: list[int] = field(default_factory=list, init=False, repr=False)
    _order_epoch: int = field(default=-1, init=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.items) // self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:  # step() asks once per step; the order changes once per epoch
            self._order, self._order_epoch = self._make_epoch_order(epoch), epoch
        return self._order

    def _make_epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        if self.length is None and self.lengths is None:
            return torch.randperm(len(self.items), generator=g).tolist()
        # transformers' LengthGroupedSampler order (random windows of global batches, each sorted by length),
        # from a generator seeded by (seed, epoch) so that it stays resumable by step (the sampler's own
        # generator state is not); then the batches are shuffled so long and short ones alternate over time.
        n = self.global_batch
        lengths = self.lengths if self.lengths is not None else [self.length(item) for item in self.items]
        order = get_length_grouped_indices(lengths, n, mega_batch_mult=self.length_window, generator=g)
        full = len(order) // n * n
        batches = [order[s : s + n] for s in range(0, full, n)]
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]] + order[full:]

    def step(self, global_step: int) -> GlobalBatch:
        epoch, index = divmod(global_step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        n = self.global_batch
        chunk = [self.items[i] for i in order[index * n : (index + 1) * n]]
        if len(chunk) < n:  # fewer items than one global batch: wrap around
            chunk += [self.items[i] for i in order[: n - len(chunk)]]
        total_weight = float(sum(self.weight(item) for item in chunk))
        # Micro-batch m of process p holds items [m * P + p :: ...] in slices of batch_size.
        micro = []
        for m in range(self.grad_accum):
            start = (m * self.num_processes + self.process_index) * self.batch_size
            micro.append(chunk[start : start + self.batch_size])
        return GlobalBatch(micro, total_weight)


def total_steps_for(plan: DataPlan, cfg: TrainingSettings) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Kept rather than accelerate's ProjectConfiguration(total_limit=...): that rotation works only with its
    checkpoint_<i> names and deletes the oldest checkpoint before the new one is written, so a kill
    during a save could leave none; here the new one is written, renamed into place, then old ones go."""

    def __init__(self, run: RunDir, accelerator: Accelerator, keep: int = 1):
        self.run, self.accelerator, self.keep = run, accelerator, keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.run.checkpoints / f"step-{step:07d}"
        tmp = self.run.checkpoints / f"tmp-step-{step:07d}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process has written its part (RNG state) before the rename
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            older = sorted(self.run.checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in older[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_latest(self) -> dict[str, Any] | None:
        latest = self.run.latest_checkpoint()
        if latest is None:
            return None
        self.accelerator.load_state(str(latest))
        state = json.loads((latest / "trainer_state.json").read_text())
        log.info("resumed from %s (step %d)", latest, state["step"])
        return state


# ----------------------------------------------------------------------------- supervised loop


LossFn = Callable[[torch.nn.Module, list[Any]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[], dict[str, float]]


@dataclass
class LoopResult:
    steps: int
    resumed_from: int | None
    evals: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False  # False when stopped early by `stop_after`


def train_supervised(
    *,
    cfg: TrainingSettings,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    plan: DataPlan,
    loss_fn: LossFn,
    evaluate: EvalFn,
    run: RunDir,
    desc: str,
    stop_after: int | None = None,
) -> LoopResult:
    """The loop SFT and the reward model share.

    `loss_fn(model, micro_batch)` returns (sum of per-item losses, stats): the sum is divided by
    the global batch's weight here, so gradient accumulation and processes do not change the
    update. `stop_after` (tests only) simulates a crash after that many steps.
    """
    total = total_steps_for(plan, cfg)
    checkpointer = Checkpointer(run, accelerator, cfg.keep_checkpoints)
    state = checkpointer.load_latest() if cfg.resume else None
    start = state["step"] if state else 0
    metrics = MetricsLogger(run, accelerator.is_main_process, resume_step=start if state else None, accelerator=accelerator)
    result = LoopResult(steps=start, resumed_from=start if state else None)

    held = parameter_bytes_per_process(model)  # under FSDP2 a shard: about 1/N of the whole
    log.info("process %d holds %.1f MB of trained and %.1f MB of frozen parameters; memory allocator: %s",
             accelerator.process_index, held["trained"] / 2**20, held["frozen"] / 2**20, allocator_in_use())  # fmt: skip
    if start == 0 and cfg.eval_at_start:
        first = evaluate()
        metrics.log(0, first, "eval")
        result.evals.append(first)
    bar = tqdm(total=total, initial=start, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(start, total):
        batch = plan.step(step)
        scale = accelerator.num_processes / batch.total_weight
        stats_sum: dict[str, float] = {}
        for i, micro in enumerate(batch.micro_batches):
            last = i == len(batch.micro_batches) - 1
            # Only the last micro-batch synchronises gradients across processes.
            ctx = accelerator.no_sync(model) if not last and accelerator.num_processes > 1 else nullcontext()
            with ctx:
                with accelerator.autocast():
                    loss_sum, stats = loss_fn(model, micro)
                accelerator.backward(loss_sum * scale)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        check_finite("gradient norm", grad_norm, step + 1)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        tokens_seen += int(stats_sum.get("tokens", 0))
        if done % cfg.log_every == 0 or done == total:
            reduced = _reduce_stats(accelerator, stats_sum)
            train_stats = _finish_stats(reduced)
            check_finite("loss", train_stats.get("loss", 0.0), done)
            elapsed = time.perf_counter() - t0
            train_stats.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), peak_memory_mb=peak_memory_mb())
            if tokens_seen:
                train_stats["tokens_per_s"] = tokens_seen * accelerator.num_processes / elapsed
            metrics.log(done, train_stats)
            bar.set_postfix({k: f"{train_stats[k]:.4g}" for k in ("loss", "accuracy", "tokens_per_s") if k in train_stats})
        bar.update(1)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            ev = evaluate()
            metrics.log(done, ev, "eval")
            result.evals.append(ev)
            model.train()
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total:
            checkpointer.save(done, {"total_steps": total})
        result.steps = done
        if stop_after is not None and done >= stop_after:
            bar.close()
            metrics.close()
            return result
    bar.close()
    final = evaluate()
    metrics.log(total, final, "eval")
    result.evals.append(final)
    result.finished = True
    metrics.close()
    return result


def _reduce_stats(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


def _finish_stats(stats: dict[str, float]) -> dict[str, float]:
    """Turn summed stats into means: `x_sum` / `x_count` -> `x`; other keys pass through."""
    out = {}
    for k, v in stats.items():
        if k.endswith("_sum"):
            name = k[: -len("_sum")]
            count = stats.get(name + "_count", 0)
            out[name] = v / count if count else float("nan")
        elif not k.endswith("_count"):
            out[k] = v
    return out


def reduce_and_finish(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    return _finish_stats(_reduce_stats(accelerator, stats))
