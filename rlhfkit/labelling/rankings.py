"""Rankings as pure functions: validation, display order, original indices, agreement.

A *ranking* of K responses is a list of tie groups of response indices, best group
first: ``[[2], [0, 1]]`` means response 2 is best and responses 0 and 1 are tied
behind it. Every index 0..K-1 appears exactly once.

The page shows each annotator the responses of a task in a shuffled *display order*
(stable per annotator and task). ``order[d]`` is the original index of the response
shown at display position ``d``; the API speaks display positions, the database and
the export speak original indices.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

FLAGS = ("unsafe", "nonsense")
"""Flags an annotator may put on a response."""


class RankingError(ValueError):
    """A ranking or flag set that does not fit the task (the API answers 422)."""


def display_order(annotator: str, task_id: str, k: int) -> list[int]:
    """The shuffled order in which ``annotator`` sees the ``k`` responses of ``task_id``.

    Deterministic (seeded from a hash of both names), so a reload, a restart or a
    second server on the same database shows the same order.
    """
    seed = int.from_bytes(hashlib.sha256(f"{annotator}\x00{task_id}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def validate_ranking(ranking: object, k: int) -> list[list[int]]:
    """Check that ``ranking`` is a list of non-empty tie groups forming a permutation of 0..k-1."""
    if not isinstance(ranking, list) or not ranking:
        raise RankingError("ranking: must be a non-empty list of tie groups (lists of response positions), best first")
    seen: list[int] = []
    for g, group in enumerate(ranking):
        if not isinstance(group, list) or not group:
            raise RankingError(f"ranking[{g}]: each tie group must be a non-empty list of response positions")
        for item in group:
            if not isinstance(item, int) or isinstance(item, bool):
                raise RankingError(f"ranking[{g}]: {item!r} is not an integer response position")
            if not 0 <= item < k:
                raise RankingError(f"ranking[{g}]: position {item} is out of range; this task has {k} responses (0..{k - 1})")
            seen.append(item)
    if len(seen) != k:
        raise RankingError(f"ranking: has {len(seen)} responses but this task has {k}; rank every response exactly once")
    if len(set(seen)) != k:
        dupes = sorted({i for i in seen if seen.count(i) > 1})
        raise RankingError(f"ranking: not a permutation, position(s) {dupes} appear more than once")
    return [list(group) for group in ranking]


_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*", re.ASCII)


def position_key(key: object) -> int | None:
    """A flags key as a position: an int, or its canonical decimal string ("2", not "02", "+2" or "٢"); else None.

    Only one spelling per position, so two keys can never name the same response.
    """
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str) and _CANONICAL_INT.fullmatch(key):
        return int(key)
    return None


def validate_flags(flags: object, k: int) -> dict[int, list[str]]:
    """``{position: [flag, ...]}`` (keys may be canonical decimal strings, as JSON makes them) -> ``{int: sorted flags}``.

    Empty flag lists are dropped.
    """
    if flags is None:
        return {}
    if not isinstance(flags, Mapping):
        raise RankingError("flags: must be an object mapping a response position to a list of flags")
    out: dict[int, list[str]] = {}
    for key, values in flags.items():
        pos = position_key(key)
        if pos is None:
            raise RankingError(f"flags: key {key!r} is not a response position (write it as 0, 1, 2, ...)")
        if not 0 <= pos < k:
            raise RankingError(f"flags: position {key!r} is out of range; this task has {k} responses (0..{k - 1})")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise RankingError(f"flags[{key!r}]: must be a list of flag names")
        unknown = sorted(set(values) - set(FLAGS))
        if unknown:
            raise RankingError(f"flags[{key!r}]: unknown flag(s) {unknown}; allowed: {list(FLAGS)}")
        if values:
            out[pos] = sorted(set(values))
    return out


def to_original(ranking: Sequence[Sequence[int]], order: Sequence[int]) -> list[list[int]]:
    """Display positions -> original response indices (tie groups sorted for a canonical form)."""
    return [sorted(order[d] for d in group) for group in ranking]


def to_display(ranking: Sequence[Sequence[int]], order: Sequence[int]) -> list[list[int]]:
    """Original response indices -> display positions (the inverse of :func:`to_original`)."""
    where = {orig: d for d, orig in enumerate(order)}
    return [sorted(where[i] for i in group) for group in ranking]


def flags_to_original(flags: Mapping[int, list[str]], order: Sequence[int]) -> dict[int, list[str]]:
    return {order[d]: list(v) for d, v in sorted(flags.items(), key=lambda kv: order[kv[0]])}


def flags_to_display(flags: Mapping[int, list[str]], order: Sequence[int]) -> dict[int, list[str]]:
    where = {orig: d for d, orig in enumerate(order)}
    return {where[i]: list(v) for i, v in flags.items()}


def rank_of(ranking: Sequence[Sequence[int]]) -> dict[int, int]:
    """Response index -> tie-group number (0 = best)."""
    return {i: g for g, group in enumerate(ranking) for i in group}


def pair_relations(ranking: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """For every pair ``i < j``: -1 if i is ranked better, 1 if j is, 0 if they are tied."""
    r = rank_of(ranking)
    return {(i, j): (r[i] > r[j]) - (r[i] < r[j]) for i, j in combinations(sorted(r), 2)}


def pair_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(pairs ordered the same way, pairs)`` for two rankings of the same responses.

    "The same way" means both put i before j, both put j before i, or both tie them.
    """
    ra, rb = pair_relations(a), pair_relations(b)
    if ra.keys() != rb.keys():
        raise ValueError("the two rankings do not rank the same responses")
    return sum(ra[p] == rb[p] for p in ra), len(ra)


def agreement(labels: Iterable[tuple[str, str, Sequence[Sequence[int]]]]) -> dict:
    """Pairwise inter-annotator agreement from ``(task_id, annotator, ranking)`` triples.

    For every pair of annotators, over the tasks both labelled: the fraction of response
    pairs they ordered the same way (pooled over those tasks). ``overall`` pools every
    annotator pair. Fractions are ``None`` where there is nothing to compare.
    """
    by_task: dict[str, dict[str, Sequence[Sequence[int]]]] = {}
    for task_id, annotator, ranking in labels:
        by_task.setdefault(task_id, {})[annotator] = ranking
    pairs: dict[tuple[str, str], list[int]] = {}
    for rankings in by_task.values():
        for a, b in combinations(sorted(rankings), 2):
            same, total = pair_agreement(rankings[a], rankings[b])
            acc = pairs.setdefault((a, b), [0, 0, 0])
            acc[0] += same
            acc[1] += total
            acc[2] += 1
    rows = [
        {"a": a, "b": b, "tasks": n_tasks, "pairs": total, "agreement": (same / total) if total else None}
        for (a, b), (same, total, n_tasks) in sorted(pairs.items())
    ]
    same_all = sum(v[0] for v in pairs.values())
    total_all = sum(v[1] for v in pairs.values())
    return {
        "pairs": rows,
        "overall": (same_all / total_all) if total_all else None,
        "shared_tasks": sum(1 for r in by_task.values() if len(r) > 1),
    }
