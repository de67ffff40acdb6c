"""On-disk data formats: demonstrations, comparisons and prompts, and readers for
HH-RLHF, OpenAssistant and Self-Instruct.

Every file is JSON Lines, optionally gzipped (`.gz`). Blank lines are skipped.

Demonstrations (step 1, SFT), one per line, either of
    {"prompt": "...", "response": "...", "system": "..." (optional), "source": "..." (optional)}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
  In the `messages` form the last message is the assistant response to learn and must
  follow a user turn; everything before it is the context.

Comparisons (step 2, reward model), three shapes, detected line by line. The prompt is
`"prompt"` (+ optional `"system"`) or `"messages"` (ending with a user turn):
    pairs    {"prompt", "chosen", "rejected"}
    K-wise   {"prompt", "responses": [...], "ranking": [...], "scores" (optional),
              "flags"/"annotator"/"meta" (optional, kept in `Comparison.meta`)}
             ranking is best first; each element is an index into `responses` or a list
             of indices that tie.
    ratings  {"prompt", "response", "score"}: lines with the same prompt (exact text) are
             grouped into one comparison ranked by score; equal scores tie.
  Every form takes an optional "source".

Prompts (step 3, PPO and evaluation): a JSON string per line, `{"prompt": ...}` or
`{"messages": [...]}`.

Errors: anything wrong in a file raises `DataError("path:line: field 'x': what is wrong")`.

Skips: records left out on purpose (e.g. HH-RLHF pairs whose two sides are identical) are
never dropped silently. Every reader logs one line per file on the "rlhfkit.data" logger
(a warning when something was skipped) and, given `stats=ReadStats()`, adds to it how
many records it returned and a count per skip reason.
"""

import gzip
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("rlhfkit.data")

ROLES = ("system", "user", "assistant")
DEFAULT_SCORE_RANGE = (1, 7)  # ratings on a 1-7 Likert scale, as in InstructGPT
FORMATS = ("jsonl", "hh-rlhf", "oasst", "self-instruct")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = list  # list[Message], ending with a user turn


# ---------------------------------------------------------------------------------------
# Errors and skip counts


class DataError(ValueError):
    """A bad record in a data file: `path:line: field 'x': what is wrong` (line is 1-based)."""

    def __init__(self, path, line: int, field: str, what: str):
        self.path, self.line, self.field, self.what = str(path), line, field, what
        super().__init__(f"{path}:{line}: field '{field}': {what}")


class _Invalid(ValueError):
    """A bad value, before we know which file and line it came from (readers turn it into a
    DataError; building a record in code with a bad value raises it as a plain ValueError)."""

    def __init__(self, field: str, what: str):
        self.field, self.what = field, what
        super().__init__(f"field '{field}': {what}")


@dataclass
class ReadStats:
    """What readers did: records returned and records skipped on purpose, by reason.
    Pass one to any reader (or `load_*`) as `stats=`; it accumulates over files."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count


# ---------------------------------------------------------------------------------------
# Field checks. Each raises _Invalid(field, what) naming the field as it appears in the file.


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _string(value, field: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise _Invalid(field, "empty string")
    return value


def _get(obj: dict, key: str, field: str | None = None):
    if key not in obj:
        raise _Invalid(field or key, "missing")
    return obj[key]


def _optional_string(obj: dict, key: str, field: str | None = None) -> str:
    """A string that may be empty or absent ("")."""
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise _Invalid(field or key, f"expected a string, got {_json_type(value)}")
    return value


def _messages(value, field: str = "messages") -> list[dict]:
    """A non-empty list of {role, content}; extra keys are dropped."""
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list of messages, got {_json_type(value)}")
    if not value:
        raise _Invalid(field, "empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(where, f"expected an object with 'role' and 'content', got {_json_type(message)}")
        role = _string(_get(message, "role", f"{where}.role"), f"{where}.role")
        if role not in ROLES:
            raise _Invalid(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _string(_get(message, "content", f"{where}.content"), f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def _prompt_messages(value, field: str = "messages") -> list[dict]:
    """Messages that a model should answer: they end with a user turn."""
    messages = _messages(value, field)
    last = messages[-1]["role"]
    if last != "user":
        raise _Invalid(f"{field}[{len(messages) - 1}].role", f"a prompt must end with a user turn, not {last!r}")
    return messages


def _context(obj: dict) -> list[dict]:
    """The prompt of a record: `messages`, or `prompt` with an optional `system`."""
    if "messages" in obj:
        if "prompt" in obj:
            raise _Invalid("prompt", "give either 'prompt' or 'messages', not both")
        return _prompt_messages(obj["messages"])
    if "prompt" not in obj:
        raise _Invalid("prompt", "missing (give 'prompt' or 'messages')")
    messages = [{"role": "user", "content": _string(obj["prompt"], "prompt")}]
    if "system" in obj:
        messages.insert(0, {"role": "system", "content": _string(obj["system"], "system")})
    return messages


def _responses(value, field: str = "responses") -> list[str]:
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list of strings, got {_json_type(value)}")
    if len(value) < 2:
        raise _Invalid(field, f"a comparison needs at least 2 responses, got {len(value)}")
    return [_string(response, f"{field}[{i}]") for i, response in enumerate(value)]


def _ranking(value, n: int, field: str = "ranking") -> list[list[int]]:
    """Tie groups, best first, covering every index 0..n-1 exactly once. A plain index is a
    group of one."""
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list of indices or tie groups, got {_json_type(value)}")
    groups, seen = [], set()
    for group in value:
        group = [group] if isinstance(group, int) and not isinstance(group, bool) else group
        if not isinstance(group, list) or not group:
            raise _Invalid(field, f"each element must be an index or a non-empty list of indices, got {group!r}")
        for index in group:
            if not isinstance(index, int) or isinstance(index, bool):
                raise _Invalid(field, f"indices must be integers, got {index!r}")
            if not 0 <= index < n:
                raise _Invalid(field, f"index {index} is out of range for {n} responses")
            if index in seen:
                raise _Invalid(field, f"index {index} appears more than once")
            seen.add(index)
        groups.append(list(group))
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise _Invalid(field, f"not a permutation of the {n} responses: missing {missing}")
    return groups


def _score(value, field: str, score_range: tuple[float, float] | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(field, f"expected a number, got {_json_type(value)}")
    if score_range is not None and not score_range[0] <= value <= score_range[1]:
        raise _Invalid(field, f"score {value} is out of range [{score_range[0]}, {score_range[1]}]")
    return float(value)


def _meta(obj: dict) -> dict:
    """Free-form annotations: a `meta` object plus the top-level `flags` and `annotator`."""
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _Invalid("meta", f"expected an object, got {_json_type(meta)}")
    meta = dict(meta)
    for key in ("flags", "annotator"):
        if key in obj:
            meta[key] = obj[key]
    return meta


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Demonstration:
    """A response to learn by imitation. `messages` is the conversation before it and ends
    with a user turn."""

    messages: list[dict]
    response: str
    source: str = ""

    def __post_init__(self):
        _prompt_messages(self.messages)
        _string(self.response, "response")


@dataclass(frozen=True)
class Comparison:
    """Responses to one prompt, ranked by a person. `ranking` lists tie groups of indices
    into `responses`, best group first; every index appears exactly once. `scores`, when
    present, are the ratings the ranking came from (one per response)."""

    messages: list[dict]
    responses: list[str]
    ranking: list[list[int]]
    source: str = ""
    scores: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        _prompt_messages(self.messages)
        _responses(self.responses)
        if _ranking(self.ranking, len(self.responses)) != self.ranking:
            raise _Invalid("ranking", "tie groups must be lists of indices")
        if self.scores is not None:
            if len(self.scores) != len(self.responses):
                raise _Invalid("scores", f"{len(self.scores)} scores for {len(self.responses)} responses")
            for i, score in enumerate(self.scores):
                _score(score, f"scores[{i}]", None)

    def pairs(self) -> list[tuple[int, int]]:
        """Every strict (better, worse) pair: K(K-1)/2 without ties, none inside a tie group."""
        return [
            (better, worse)
            for g, group in enumerate(self.ranking)
            for lower in self.ranking[g + 1 :]
            for better in group
            for worse in lower
        ]

    def margin(self, better: int, worse: int) -> float | None:
        """How much better `better` was rated than `worse` (score difference), None without scores."""
        if self.scores is None:
            return None
        return self.scores[better] - self.scores[worse]


# ---------------------------------------------------------------------------------------
# Reading and writing JSON Lines


def _open(path, mode: str):
    path = Path(path)
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def _jsonl_rows(path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line."""
    with _open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, "<line>", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, "<line>", f"malformed JSON: {e.msg} (column {e.colno})") from None


def _objects(path) -> Iterator[tuple[int, dict]]:
    for line_no, obj in _jsonl_rows(path):
        if not isinstance(obj, dict):
            raise DataError(path, line_no, "<line>", f"expected a JSON object, got {_json_type(obj)}")
        yield line_no, obj


def _finish(path, kind: str, records: list, skipped: Counter, stats: ReadStats | None, last_line: int = 1):
    """Refuse a file that gave nothing, count, and report what was skipped."""
    skipped = +skipped  # drop zero counts
    why = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
    if not records:
        raise DataError(path, last_line, "<file>", f"no {kind} in file" + (f" (skipped: {why})" if why else ""))
    if stats is not None:
        stats.records += len(records)
        stats.skipped.update(skipped)
    if skipped:
        log.warning("%s: read %d %s, skipped %d (%s)", path, len(records), kind, sum(skipped.values()), why)
    else:
        log.info("%s: read %d %s", path, len(records), kind)
    return records


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
    if "messages" not in obj:
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
    """Demonstrations in the prompt/response or messages form."""
    demos, line_no = [], 1
    for line_no, obj in _objects(path):
        try:
            demos.append(_demonstration_from_json(obj))
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
    return _finish(path, "demonstrations", demos, Counter(), stats, line_no)


def read_comparisons(
    path, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> list[Comparison]:
    """Comparisons in any of the three forms (pairs, K-wise, ratings), detected per line.
    Ratings of one prompt become one comparison, placed where the prompt first appears.
    Skipped (counted): pairs with chosen == rejected ("identical"), rated prompts with a
    single response ("single_rating") or all scores equal ("all_ratings_equal")."""
    items, rated, skipped, line_no = [], {}, Counter(), 1
    for line_no, obj in _objects(path):
        try:
            source = _optional_string(obj, "source")
            if "chosen" in obj or "rejected" in obj:
                if "prompt" not in obj and "messages" not in obj:
                    raise _Invalid("prompt", "missing (for raw HH-RLHF transcripts use the spec 'hh-rlhf:PATH')")
                messages = _context(obj)
                chosen = _string(_get(obj, "chosen"), "chosen")
                rejected = _string(_get(obj, "rejected"), "rejected")
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

    comparisons = []
    for item in items:
        if isinstance(item, dict):
            item = _comparison_from_ratings(**item, skipped=skipped)
        if item is not None:
            comparisons.append(item)
    return _finish(path, "comparisons", comparisons, skipped, stats, line_no)


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
    """Prompts as message lists: a JSON string per line, {"prompt", "system"?} or {"messages"}."""
    prompts, line_no = [], 1
    for line_no, obj in _jsonl_rows(path):
        try:
            if isinstance(obj, str):
                prompts.append([{"role": "user", "content": _string(obj, "<line>")}])
            elif isinstance(obj, dict):
                prompts.append(_context(obj))
            else:
                raise _Invalid("<line>", f"expected a string or an object, got {_json_type(obj)}")
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
    return _finish(path, "prompts", prompts, Counter(), stats, line_no)


# ---------------------------------------------------------------------------------------
# HH-RLHF (Anthropic): {"chosen": transcript, "rejected": transcript}, where a transcript is
# "\n\nHuman: ...\n\nAssistant: ..." and the two differ only in the last Assistant turn.

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"


def parse_hh_transcript(text: str, field: str = "transcript") -> list[dict]:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", ...}, {"role": "assistant", ...}].
    Consecutive turns of one speaker (a few transcripts have them) are joined into one
    message. Turns may come out empty; callers decide what to do with them."""
    parts = _HH_TURN.split(text)  # [text before the first turn, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise _Invalid(field, "a transcript must start with '\\n\\nHuman:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _hh_source(path) -> str:
    """hh-rlhf/helpful-base from .../helpful-base.jsonl.gz"""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return f"hh-rlhf/{name}"


def read_hh_rlhf(path, *, stats: ReadStats | None = None) -> list[Comparison]:
    """HH-RLHF pairs as comparisons (chosen is response 0). Each transcript is split at its
    last "\\n\\nAssistant:" into prompt and response. A line that is not two transcripts is a
    DataError; the known quirks of the real data are skipped and counted:
      identical           chosen and rejected are the same (up to surrounding whitespace)
      prompt_mismatch     the two prompts differ (a response contained "\\n\\nAssistant:")
      empty_response      a side's last Assistant turn is empty
      empty_turn          an empty turn inside the prompt
      prompt_not_user_last  the prompt ends with an Assistant turn"""
    source, comparisons, skipped, line_no = _hh_source(path), [], Counter(), 1
    for line_no, obj in _objects(path):
        try:
            sides = {}
            for key in ("chosen", "rejected"):
                text = _string(_get(obj, key), key)
                cut = text.rfind(_HH_LAST)
                if cut < 0:
                    raise _Invalid(key, "no '\\n\\nAssistant:' turn in the transcript")
                sides[key] = (text[:cut], text[cut + len(_HH_LAST) :].strip())
            (prompt, chosen), (other_prompt, rejected) = sides["chosen"], sides["rejected"]
            messages = parse_hh_transcript(prompt, "chosen")
            if not messages:
                raise _Invalid("chosen", "no Human turn before the last '\\n\\nAssistant:'")
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
        if obj["chosen"] == obj["rejected"] or (prompt == other_prompt and chosen == rejected):
            skipped["identical"] += 1
        elif prompt != other_prompt:
            skipped["prompt_mismatch"] += 1
        elif not chosen or not rejected:
            skipped["empty_response"] += 1
        elif not all(m["content"] for m in messages):
            skipped["empty_turn"] += 1
        elif messages[-1]["role"] != "user":
            skipped["prompt_not_user_last"] += 1
        else:
            comparisons.append(Comparison(messages, [chosen, rejected], [[0], [1]], source))
    return _finish(path, "comparisons", comparisons, skipped, stats, line_no)


def read_hh_rlhf_demonstrations(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """The chosen side of every HH-RLHF pair that read_hh_rlhf keeps."""
    return [Demonstration(c.messages, c.responses[0], c.source) for c in read_hh_rlhf(path, stats=stats)]


# ---------------------------------------------------------------------------------------
# OpenAssistant message trees: {"message_tree_id", "prompt": node}, where a node is
# {"role": "prompter" | "assistant", "text", "rank" (0 = best among siblings, may be null or
# absent), "synthetic", "deleted", "replies": [node, ...]}.

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

    for line_no, obj in _objects(path):
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
    return _finish(path, "demonstrations", demos, skipped, stats, last)


def read_oasst_comparisons(path, *, stats: ReadStats | None = None) -> list[Comparison]:
    """For each human prompter turn, its human assistant replies ranked by `rank` (K-wise;
    equal ranks tie). Replies without a rank that have siblings are left out of the
    comparison (counted as "unranked")."""
    _, comparisons, _, skipped, unranked, last = _read_oasst(path)
    return _finish(path, "comparisons", comparisons, skipped + unranked, stats, last)


def read_oasst_prompts(path, *, stats: ReadStats | None = None) -> list[list[dict]]:
    """The first (root) prompt of every human-written tree."""
    _, _, roots, skipped, _, last = _read_oasst(path)
    return _finish(path, "prompts", roots, skipped, stats, last)


# ---------------------------------------------------------------------------------------
# Self-Instruct user-oriented instructions: {"instruction", "instances": [{"input", "output"}]}


def read_self_instruct(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """One demonstration per instance; the prompt is the instruction, then the input (if any)
    after a blank line."""
    demos, line_no = [], 1
    for line_no, obj in _objects(path):
        try:
            instruction = _string(_get(obj, "instruction"), "instruction").strip()
            instances = _get(obj, "instances")
            if not isinstance(instances, list) or not instances:
                raise _Invalid("instances", f"expected a non-empty list, got {_json_type(instances)}")
            for i, instance in enumerate(instances):
                if not isinstance(instance, dict):
                    raise _Invalid(f"instances[{i}]", f"expected an object, got {_json_type(instance)}")
                task_input = _optional_string(instance, "input", f"instances[{i}].input")
                output = _string(_get(instance, "output", f"instances[{i}].output"), f"instances[{i}].output")
                prompt = instruction + ("\n\n" + task_input.strip() if task_input.strip() else "")
                demos.append(Demonstration([{"role": "user", "content": prompt}], output.strip(), "self-instruct"))
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
    return _finish(path, "demonstrations", demos, Counter(), stats, line_no)


# ---------------------------------------------------------------------------------------
# Specs: what configs name. "FORMAT:PATH" or just "PATH" (= "jsonl:PATH"), or a list of them.


def parse_spec(spec) -> tuple[str, str]:
    """'hh-rlhf:data/helpful-base.jsonl.gz' -> ('hh-rlhf', 'data/helpful-base.jsonl.gz')."""
    text = str(spec)
    match = re.fullmatch(r"([a-z][a-z0-9-]+):(.+)", text, flags=re.DOTALL)
    if match is None:
        return "jsonl", text
    fmt, path = match.groups()
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} in {text!r} (expected one of {', '.join(FORMATS)})")
    return fmt, path


def _load(spec, readers: dict, kind: str, **kwargs) -> list:
    if isinstance(spec, (list, tuple)):
        return [record for one in spec for record in _load(one, readers, kind, **kwargs)]
    fmt, path = parse_spec(spec)
    if fmt not in readers:
        raise ValueError(f"{spec!r}: the {fmt} format has no {kind} (use one of {', '.join(readers)})")
    return readers[fmt](path, **kwargs)


def _unique(prompts: list[list[dict]], stats: ReadStats | None) -> list[list[dict]]:
    """Drop repeated prompts (counted as "duplicate_prompt")."""
    seen, unique = set(), []
    for messages in prompts:
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            unique.append(messages)
    repeats = len(prompts) - len(unique)
    if repeats:
        log.warning("dropped %d repeated prompts (duplicate_prompt=%d)", repeats, repeats)
    if stats is not None:
        stats.records -= repeats
        stats.skipped["duplicate_prompt"] += repeats
    return unique


def load_demonstrations(spec, *, stats: ReadStats | None = None) -> list[Demonstration]:
    return _load(
        spec,
        {
            "jsonl": read_demonstrations,
            "hh-rlhf": read_hh_rlhf_demonstrations,
            "oasst": read_oasst_demonstrations,
            "self-instruct": read_self_instruct,
        },
        "demonstrations",
        stats=stats,
    )


def load_comparisons(
    spec, *, score_range: tuple[float, float] | None = DEFAULT_SCORE_RANGE, stats: ReadStats | None = None
) -> list[Comparison]:
    def jsonl(path, stats):
        return read_comparisons(path, score_range=score_range, stats=stats)

    readers = {"jsonl": jsonl, "hh-rlhf": read_hh_rlhf, "oasst": read_oasst_comparisons}
    return _load(spec, readers, "comparisons", stats=stats)


def load_prompts(spec, *, stats: ReadStats | None = None) -> list[list[dict]]:
    """Prompts from a prompts file, or the prompts of an HH-RLHF, OASST (tree roots) or
    Self-Instruct file (repeats dropped for those, counted as "duplicate_prompt")."""

    def prompts_of(reader):
        return lambda path, stats: _unique([r.messages for r in reader(path, stats=stats)], stats)

    readers = {
        "jsonl": read_prompts,
        "hh-rlhf": prompts_of(read_hh_rlhf),
        "oasst": read_oasst_prompts,
        "self-instruct": prompts_of(read_self_instruct),
    }
    return _load(spec, readers, "prompts", stats=stats)


# ---------------------------------------------------------------------------------------
# Train/eval split


def _split_key(record) -> str:
    """What must not be on both sides: the opening user turn. Keying on it (not the whole
    conversation) also keeps together the turns of one OASST tree and HH-RLHF conversations
    that start the same way."""
    messages = record if isinstance(record, list) else record.messages
    return next((m["content"] for m in messages if m["role"] == "user"), json.dumps(messages))


def split_by_prompt(records: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, eval) split of Demonstrations, Comparisons or prompts by hashing
    the prompt: a prompt is on one side only, and a record's side depends only on its prompt
    and the seed (not on the order or the other records). If hashing leaves eval empty while
    eval_fraction > 0, the prompt with the smallest hash is moved to eval (tiny data sets)."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")

    def bucket(key: str) -> float:  # uniform in [0, 1), a pure function of (seed, prompt)
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    buckets = {key: bucket(key) for key in {_split_key(r) for r in records}}
    to_eval = {key for key, b in buckets.items() if b < eval_fraction}
    if eval_fraction > 0 and not to_eval and len(buckets) >= 2:
        to_eval = {min(buckets, key=buckets.get)}
    train = [r for r in records if _split_key(r) not in to_eval]
    evaluation = [r for r in records if _split_key(r) in to_eval]
    return train, evaluation
