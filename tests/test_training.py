"""The data plan (a pure function of seed and epoch; grouping by length), the schedule and the trackers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from rlhfkit.training import DataPlan


def _plan(items, **kw) -> DataPlan:
    return DataPlan(items=items, batch_size=4, grad_accum=2, num_processes=1, process_index=0, seed=3, **kw)


def _padded_tokens(plan: DataPlan, epoch: int) -> int:
    """Tokens computed when every micro-batch is padded to its longest item."""
    total = 0
    for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
        for micro in plan.step(step).micro_batches:
            total += max(len(x) for x in micro) * len(micro)
    return total


def test_group_by_length_keeps_every_item_once_and_cuts_padding():
    rng = random.Random(0)
    items = ["x" * rng.randint(1, 300) for _ in range(8 * 40)]  # 40 global batches of 8
    plain, grouped = _plan(items), _plan(items, length=len, length_window=8)
    for epoch in range(2):
        order = grouped.epoch_order(epoch)
        assert sorted(order) == list(range(len(items)))  # a permutation: every item once per epoch
        assert order == grouped.epoch_order(epoch)  # a pure function of (seed, epoch): resumable
        assert _padded_tokens(grouped, epoch) < 0.8 * _padded_tokens(plain, epoch)
    assert grouped.epoch_order(0) != grouped.epoch_order(1)
    # the global batches come in a shuffled order, not longest first
    first_lengths = [max(len(items[i]) for i in grouped.epoch_order(0)[s : s + 8]) for s in range(0, 64, 8)]
    assert first_lengths != sorted(first_lengths, reverse=True)


# ----------------------------------------------------------------------------- schedule (transformers')


def test_schedule_warms_up_then_decays_to_the_floor():
    import torch

    from rlhfkit.config import SFTConfig
    from rlhfkit.training import make_scheduler

    cfg = SFTConfig(learning_rate=1.0, warmup_ratio=0.2, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # 2 warm-up steps: 1/2, 2/2; then cosine over 8 steps from 1 to 0.1, at (k + 1) / 8 of the way
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k + 1) / 8)) for k in range(8)]
    assert lrs == pytest.approx([0.5, 1.0] + cosine)
    assert lrs[-1] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- trackers (accelerate's)


def wandb_history(run_file: Path) -> dict[int, dict]:
    """step -> metrics, read back from a W&B offline run file (LevelDB-log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer / padding
            pos += left
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in record.history.item}
                rows[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def test_report_to_wandb_offline_gets_the_metrics_of_metrics_jsonl(tiny_model_dir, demos_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rlhfkit.config import SFTConfig
    from rlhfkit.sft import run_sft
    from rlhfkit.training import read_metrics

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing may go to the network
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(demos_file), output_dir=str(out), report_to=["wandb"], batch_size=4,
                    max_steps=3, eval_every=2, checkpoint_every=0, precision="fp32", max_length=48)  # fmt: skip
    run_sft(cfg)
    expected: dict[int, dict] = {}
    for m in read_metrics(out / "metrics.jsonl"):
        values = {f"{m['phase']}/{k}": v for k, v in m.items() if k not in ("step", "phase", "time")}
        expected.setdefault(m["step"], {}).update(values)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_history(run_file) == expected
    assert sorted(expected) == [0, 1, 2, 3] and "train/loss" in expected[3] and "eval/loss" in expected[2]


@pytest.mark.parametrize("names, message", [(["tensorbored"], "unknown tracker 'tensorbored'"), (["missing"], "is not installed")])
def test_report_to_an_unknown_or_missing_tracker_is_a_config_error(tmp_path, names, message):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    from rlhfkit.config import ConfigError, SFTConfig, load_config

    if names == ["missing"]:
        missing = [n for n in LOGGER_TYPE_TO_CLASS if not getattr(imports, f"is_{n}_available")()]
        if not missing:
            pytest.skip("every tracker accelerate knows is installed")
        names = missing[:1]
    path = tmp_path / "sft.yaml"
    path.write_text(f"report_to: {json.dumps(names)}\n")
    with pytest.raises(ConfigError, match=rf"sft.yaml:1: field 'report_to': .*{message}"):
        load_config(SFTConfig, path)


def test_metrics_logger_without_an_accelerator_writes_jsonl_and_tensorboard_and_trims_on_resume(tmp_path):
    import torch

    from rlhfkit.training import MetricsLogger, RunDir, read_metrics

    run = RunDir(tmp_path / "run")
    first = MetricsLogger(run)
    for step in (1, 2, 3):
        first.log(step, {"loss": torch.tensor(1.0 / step), "lr": 0.1})
    first.log(3, {"loss": 2.0}, "eval")
    first.close()
    resumed = MetricsLogger(run, resume_step=2)  # steps after 2 will be redone: their lines go
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert [(m["step"], m["phase"], m["loss"]) for m in read_metrics(run.metrics_file)] == [
        (1, "train", 1.0), (2, "train", 0.5), (3, "train", 0.25)
    ]  # fmt: skip
    assert list((run.path / "tb").glob("events.out.tfevents.*"))
