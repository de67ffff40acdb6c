"""OpenAssistant message trees: {"message_tree_id", "prompt": node}, where a node is
{"role": "prompter" | "assistant", "text", "rank" (0 = best among siblings, may be null or
absent), "synthetic", "deleted", "replies": [node, ...]}."""

from collections import Counter

from .containers import finish, objects
from .records import Comparison, DataError, Demonstration, ReadStats, _get, _Invalid, _json_type, _string


_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _read_oasst(path):
    """Walk every tree once. Returns (demonstrations, comparisons, root prompts, skipped
    nodes, unranked replies). Synthetic and deleted nodes are left out with their subtrees."""
    demos, comparisons, roots, skipped, unranked, line_no = [], [], [], Counter(), Counter(), 1

    def keep(node, where) -> bool:
        if not isinstance(node, dict):
            raise _Invalid(where, f"expected a message object, got {_json_type(node)}")
        for flag in ("synthetic", "deleted"):  # model-written or removed: prune the subtree
            if node.get(flag):
                skipped[flag] += 1
                return False
        return True

    def visit(node, where, history, tree_id):
        role = _get(node, "role", f"{where}.role")
        if role not in _OASST_ROLES:
            raise _Invalid(f"{where}.role", f"unknown role {role!r} (expected prompter or assistant)")
        expected = "prompter" if not history or history[-1]["role"] == "assistant" else "assistant"
        if role != expected:  # turns alternate, starting with the prompter
            raise _Invalid(f"{where}.role", f"expected a {expected} message here, got {role!r}")
        text = _string(_get(node, "text", f"{where}.text"), f"{where}.text")
        if role == "assistant":
            demos.append(Demonstration(history, text, "oasst"))
        conversation = history + [{"role": _OASST_ROLES[role], "content": text}]

        replies = node.get("replies", [])
        if not isinstance(replies, list):
            raise _Invalid(f"{where}.replies", f"expected a list, got {_json_type(replies)}")
        children = []
        for i, child in enumerate(replies):
            child_where = f"{where}.replies[{i}]"
            if keep(child, child_where):
                rank = child.get("rank")
                if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
                    raise _Invalid(f"{child_where}.rank", f"expected an integer or null, got {_json_type(rank)}")
                children.append((rank, child, child_where))
        children.sort(key=lambda c: (c[0] is None, c[0] or 0))  # best rank first, unranked last (stable)

        if role == "prompter":  # the ranked assistant replies to this turn are one K-wise comparison
            ranked = [(rank, child, child_where) for rank, child, child_where in children if rank is not None]
            if len(children) >= 2:  # a reply without rank among siblings misses its comparison
                unranked["unranked"] += len(children) - len(ranked)
            if len(ranked) >= 2:
                ranks = sorted({rank for rank, _, _ in ranked})
                ranking = [[i for i, (rank, _, _) in enumerate(ranked) if rank == r] for r in ranks]
                responses = [_string(_get(c, "text", f"{w}.text"), f"{w}.text") for _, c, w in ranked]
                meta = {"message_tree_id": tree_id, "parent_id": node.get("message_id")}
                comparisons.append(Comparison(conversation, responses, ranking, "oasst", meta=meta))
        for _, child, child_where in children:
            visit(child, child_where, conversation, tree_id)

    for line_no, obj in objects(path):
        try:
            root = _get(obj, "prompt")
            if keep(root, "prompt"):
                visit(root, "prompt", [], obj.get("message_tree_id"))
                roots.append([{"role": "user", "content": root["text"]}])
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
    return demos, comparisons, roots, skipped, unranked, line_no


def read_oasst_demonstrations(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """Every human-written assistant reply, with the conversation leading to it, in depth-
    first order visiting better-ranked replies first."""
    demos, _, _, skipped, _, last = _read_oasst(path)
    return finish(path, "demonstrations", demos, skipped, stats, last)


def read_oasst_comparisons(path, *, stats: ReadStats | None = None) -> list[Comparison]:
    """For each human prompter turn, its human assistant replies ranked by `rank` (K-wise;
    equal ranks tie). Replies without a rank that have siblings are left out of the
    comparison (counted as "unranked")."""
    _, comparisons, _, skipped, unranked, last = _read_oasst(path)
    return finish(path, "comparisons", comparisons, skipped + unranked, stats, last)


def read_oasst_prompts(path, *, stats: ReadStats | None = None) -> list[list[dict]]:
    """The first (root) prompt of every human-written tree."""
    _, _, roots, skipped, _, last = _read_oasst(path)
    return finish(path, "prompts", roots, skipped, stats, last)
