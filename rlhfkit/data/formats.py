"""rlhfkit's own record shapes (one JSON object a line, or a dataset row), with TRL's formats beside
them, and the writers. Shapes are detected record by record.

Demonstrations (step 1, SFT), either of
    {"prompt": "...", "response": "...", "system": "..." (optional), "source": "..." (optional)}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
    {"prompt": ..., "completion": ...}  (TRL prompt-completion, standard or conversational)
  In the `messages` form the last message is the assistant response to learn and must
  follow a user turn; everything before it is the context.

Comparisons (step 2, reward model), three shapes. The prompt is `"prompt"` (a string, + optional
`"system"`, or TRL's message list) or `"messages"` (ending with a user turn):
    pairs    {"prompt", "chosen", "rejected"}; chosen/rejected strings or TRL's one-assistant-message
             lists; or TRL's implicit prompt {"chosen": conversation, "rejected": conversation}
    K-wise   {"prompt", "responses": [...], "ranking": [...], "scores" (optional),
              "flags"/"annotator"/"meta" (optional, kept in `Comparison.meta`)}
             ranking is best first; each element is an index into `responses` or a list
             of indices that tie.
    ratings  {"prompt", "response", "score"}: records with the same prompt (exact text) are
             grouped into one comparison ranked by score; equal scores tie.
  Every form takes an optional "source".

Prompts (step 3, PPO and evaluation): a JSON string per line, `{"prompt": ...}` (TRL's prompt-only,
standard or conversational) or `{"messages": [...]}`.
"""

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from . import trl
from .containers import _open, finish, objects, report, rows
from .records import (
    Comparison,
    DataError,
    Demonstration,
    ReadStats,
    _get,
    _Invalid,
    _json_type,
    _messages,
    _meta,
    _optional_string,
    _prompt_messages,
    _ranking,
    _responses,
    _score,
    _string,
)

DEFAULT_SCORE_RANGE = (1, 7)  # ratings on a 1-7 Likert scale, as in InstructGPT


def _context(obj: dict) -> list[dict]:
    """The prompt of a record: `messages`, or `prompt` with an optional `system`."""
    if "messages" in obj:
        if "prompt" in obj:
            raise _Invalid("prompt", "give either 'prompt' or 'messages', not both")
        return _prompt_messages(obj["messages"])
    if "prompt" not in obj:
        raise _Invalid("prompt", "missing (give 'prompt' or 'messages')")
    messages = trl.prompt(obj["prompt"])
    if "system" in obj and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _string(obj["system"], "system")})
    return messages


def demonstration_to_json(demo: Demonstration) -> dict:
    """Canonical form: the whole conversation, response last."""
    out = {"messages": demo.messages + [{"role": "assistant", "content": demo.response}]}
    if demo.source:
        out["source"] = demo.source
    return out


def comparison_to_json(comparison: Comparison, pairs_form: bool = False) -> dict:
    """Canonical K-wise form (singleton tie groups written as plain indices), or with
    `pairs_form=True` the {messages, chosen, rejected} form of a two-response comparison
    ranked [[0], [1]]."""
    c = comparison
    out = {"messages": c.messages}
    if pairs_form:
        if c.ranking != [[0], [1]] or c.scores is not None:
            raise ValueError("pairs_form needs two responses ranked [[0], [1]] and no scores")
        out |= {"chosen": c.responses[0], "rejected": c.responses[1]}
    else:
        out |= {"responses": c.responses, "ranking": [g[0] if len(g) == 1 else g for g in c.ranking]}
        if c.scores is not None:
            out["scores"] = c.scores
    if c.source:
        out["source"] = c.source
    if c.meta:
        out["meta"] = c.meta
    return out


def prompt_to_json(messages: list[dict]) -> dict:
    return {"messages": messages}


def write_jsonl(path, records: Iterable) -> int:
    """Write records (Demonstration, Comparison, prompt message lists, or plain JSON values)
    one a line, gzipped if the path ends in .gz. Returns the number written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with _open(path, "wt") as f:
        for record in records:
            if isinstance(record, Demonstration):
                record = demonstration_to_json(record)
            elif isinstance(record, Comparison):
                record = comparison_to_json(record)
            elif isinstance(record, list):
                record = prompt_to_json(record)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------------------------
# Canonical readers


def _demonstration_from_json(obj: dict) -> Demonstration:
    source = _optional_string(obj, "source")
    if "completion" in obj:
        return Demonstration(*trl.prompt_completion(obj), source)
    if "messages" not in obj:
        if "text" in obj and "prompt" not in obj:
            raise _Invalid("text", "TRL's language-modeling format has no prompt to mask: give prompt/completion or messages")
        return Demonstration(_context(obj), _string(_get(obj, "response"), "response"), source)
    if "prompt" in obj or "response" in obj:
        raise _Invalid("messages", "give either 'messages' or 'prompt'/'response', not both")
    messages = _messages(obj["messages"])
    last = len(messages) - 1
    role = messages[last]["role"]
    if role != "assistant":
        raise _Invalid(f"messages[{last}].role", f"the last message must be the assistant response to learn, not {role!r}")
    if last == 0 or messages[last - 1]["role"] != "user":
        raise _Invalid(f"messages[{last}].role", "the assistant response must follow a user turn")
    return Demonstration(messages[:-1], messages[last]["content"], source)


def read_demonstrations(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """Demonstrations in the prompt/response, messages or TRL prompt-completion form."""
    return list(iter_demonstrations(path, stats=stats))


def iter_demonstrations(path, *, stats: ReadStats | None = None) -> Iterator[Demonstration]:
    """`read_demonstrations`, one record at a time."""
    count, line_no = 0, 1
    for line_no, obj in objects(path):
        try:
            demo = _demonstration_from_json(obj)
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
        count += 1
        yield demo
    report(path, "demonstrations", count, Counter(), stats, line_no)


def read_comparisons(
    path, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> list[Comparison]:
    """Comparisons in any of the three forms (pairs, K-wise, ratings), detected per line.
    Ratings of one prompt become one comparison, placed where the prompt first appears.
    Skipped (counted): pairs with chosen == rejected ("identical"), rated prompts with a
    single response ("single_rating") or all scores equal ("all_ratings_equal")."""
    return list(iter_comparisons(path, score_range=score_range, stats=stats))


def iter_comparisons(
    path, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> Iterator[Comparison]:
    """`read_comparisons`, one record at a time. Only ratings are held back: from the first one on, records
    wait until the end of the file (a prompt's ratings may be anywhere in it) to keep the file's order."""
    items, rated, skipped, line_no, count = [], {}, Counter(), 1, 0
    for line_no, obj in objects(path):
        if not rated:  # nothing waits for later ratings: what came so far can go
            count += len(items)
            yield from items
            items.clear()
        try:
            source = _optional_string(obj, "source")
            if "chosen" in obj or "rejected" in obj:
                if trl.has_implicit_prompt(obj):
                    messages, chosen, rejected = trl.implicit_prompt(obj)
                else:
                    if "prompt" not in obj and "messages" not in obj:
                        what = "missing (give a prompt, or conversations for an implicit one; for HH-RLHF transcripts use 'hh-rlhf:PATH')"
                        raise _Invalid("prompt", what)
                    messages = _context(obj)
                    chosen = trl.assistant_turn(_get(obj, "chosen"), "chosen")
                    rejected = trl.assistant_turn(_get(obj, "rejected"), "rejected")
                if chosen == rejected:
                    skipped["identical"] += 1
                    continue
                items.append(Comparison(messages, [chosen, rejected], [[0], [1]], source, meta=_meta(obj)))
            elif "responses" in obj or "ranking" in obj:
                messages = _context(obj)
                responses = _responses(_get(obj, "responses"))
                ranking = _ranking(_get(obj, "ranking"), len(responses))
                scores = obj.get("scores")
                if scores is not None:
                    if not isinstance(scores, list) or len(scores) != len(responses):
                        what = f"expected a list of {len(responses)} numbers, got {_json_type(scores)}"
                        raise _Invalid("scores", what)
                    scores = [_score(s, f"scores[{i}]", score_range) for i, s in enumerate(scores)]
                items.append(Comparison(messages, responses, ranking, source, scores, _meta(obj)))
            elif "score" in obj or "response" in obj:
                messages = _context(obj)
                response = _string(_get(obj, "response"), "response")
                score = _score(_get(obj, "score"), "score", score_range)
                key = json.dumps(messages)
                if key not in rated:  # the group goes where its prompt first appears
                    rated[key] = {"messages": messages, "responses": [], "scores": [], "source": source}
                    items.append(rated[key])
                rated[key]["responses"].append(response)
                rated[key]["scores"].append(score)
            else:
                what = "missing: a comparison needs 'chosen'/'rejected', 'responses'/'ranking' or 'response'/'score'"
                raise _Invalid("responses", what)
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None

    for item in items:
        if isinstance(item, dict):
            item = _comparison_from_ratings(**item, skipped=skipped)
        if item is not None:
            count += 1
            yield item
    report(path, "comparisons", count, skipped, stats, line_no)


def _comparison_from_ratings(messages, responses, scores, source, skipped: Counter) -> Comparison | None:
    """Rank by score, best first; equal scores form a tie group (no pair between them)."""
    if len(responses) < 2:
        skipped["single_rating"] += 1
        return None
    levels = sorted(set(scores), reverse=True)
    if len(levels) < 2:
        skipped["all_ratings_equal"] += 1
        return None
    ranking = [[i for i, s in enumerate(scores) if s == level] for level in levels]
    return Comparison(messages, responses, ranking, source, scores)


def read_prompts(path, *, stats: ReadStats | None = None) -> list[list[dict]]:
    """Prompts as message lists: a JSON string per line, {"prompt", "system"?} or {"messages"}; the prompt
    of any other TRL record (prompt-completion, preference, the shared start of an implicit-prompt pair)."""
    prompts, line_no = [], 1
    for line_no, obj in rows(path):
        try:
            if isinstance(obj, str):
                prompts.append([{"role": "user", "content": _string(obj, "<line>")}])
            elif isinstance(obj, dict):
                prompts.append(trl.implicit_prompt(obj)[0] if trl.has_implicit_prompt(obj) else _context(obj))
            else:
                raise _Invalid("<line>", f"expected a string or an object, got {_json_type(obj)}")
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
    return finish(path, "prompts", prompts, Counter(), stats, line_no)
