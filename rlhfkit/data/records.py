"""The records every step reads (demonstrations, comparisons, prompts), the error that names a
bad record's file, line and field, and the field checks the readers share.

Each check raises `_Invalid(field, what)` naming the field as it appears in the file; a reader
turns it into `DataError("path:line: field 'x': what")` once it knows where the record came from.
"""

import math
from collections import Counter
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")

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
