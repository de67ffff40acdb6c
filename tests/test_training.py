"""The data plan: the order of training items is a pure function of (seed, epoch); grouping by length."""

from __future__ import annotations

import random

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
