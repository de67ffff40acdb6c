"""The labelling task file: JSONL written by ``rlhfkit candidates``, one task per line.

    {"id": "t1",
     "messages": [{"role": "user", "content": "..."}],      # or "prompt": "..."
     "responses": [{"text": "...", "model": "name", "sampling": {...}}, ...]}

Every error is a ``ValueError("path:line: field 'x': what is wrong")``, raised before
anything else happens (the server reads the whole file before it creates a database).
A task id must be URL-safe (letters, digits, ``_ . : -``; not starting with a dot), so
that the page can always submit or skip the task it was handed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
TASK_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}", re.ASCII)


def is_safe_task_id(task_id: object) -> bool:
    """A task id that travels unchanged in a URL path segment (no ``/``, ``..``, ``%``, spaces...)."""
    return isinstance(task_id, str) and TASK_ID_RE.fullmatch(task_id) is not None


@dataclass(frozen=True)
class Task:
    id: str
    messages: list[dict]
    responses: list[str]
    models: list[str | None]
    sampling: list[dict | None] = field(default_factory=list)

    @property
    def prompt(self) -> str | None:
        """The content of the first user turn (``None`` if there is none)."""
        return next((m["content"] for m in self.messages if m["role"] == "user"), None)

    @property
    def k(self) -> int:
        return len(self.responses)


def _err(path: str | Path, line: int, fld: str, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: field '{fld}': {msg}")


def parse_task(obj: object, path: str | Path = "<task>", line: int = 1) -> Task:
    """Validate one decoded JSON object as a task."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line}: a task must be a JSON object, got {type(obj).__name__}")
    task_id = obj.get("id")
    if not isinstance(task_id, str) or not task_id.strip():
        raise _err(path, line, "id", f"must be a non-empty string, got {task_id!r}")
    if len(task_id) > 200:
        raise _err(path, line, "id", "is longer than 200 characters")
    if not is_safe_task_id(task_id):
        raise _err(
            path, line, "id",
            f"{task_id!r} has characters a URL cannot carry safely; use letters, digits and _ . : - "
            "(not starting with a dot)",
        )

    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages and has_prompt:
        raise _err(path, line, "prompt", "give either 'messages' or 'prompt', not both")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _err(path, line, "prompt", "must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
    elif has_messages:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise _err(path, line, "messages", "must be a non-empty list of {role, content} objects")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise _err(path, line, f"messages[{i}]", "must be an object with 'role' and 'content'")
            if m.get("role") not in ROLES:
                raise _err(path, line, f"messages[{i}].role", f"must be one of {list(ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise _err(path, line, f"messages[{i}].content", "must be a string")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user":
            raise _err(path, line, "messages", "must end with a user turn (the prompt the responses answer)")
    else:
        raise _err(path, line, "messages", "missing: give 'messages' (a conversation ending with a user turn) or 'prompt'")

    raw_responses = obj.get("responses")
    if not isinstance(raw_responses, list):
        raise _err(path, line, "responses", "missing or not a list of {text, model, sampling} objects")
    if len(raw_responses) < 2:
        raise _err(path, line, "responses", f"needs at least 2 responses to rank, got {len(raw_responses)}")
    texts: list[str] = []
    models: list[str | None] = []
    sampling: list[dict | None] = []
    for i, r in enumerate(raw_responses):
        if not isinstance(r, dict):
            raise _err(path, line, f"responses[{i}]", "must be an object with 'text' (and optionally 'model', 'sampling')")
        if not isinstance(r.get("text"), str):
            raise _err(path, line, f"responses[{i}].text", "missing or not a string")
        model = r.get("model")
        if model is not None and not isinstance(model, str):
            raise _err(path, line, f"responses[{i}].model", "must be a string")
        samp = r.get("sampling")
        if samp is not None and not isinstance(samp, dict):
            raise _err(path, line, f"responses[{i}].sampling", "must be an object")
        texts.append(r["text"])
        models.append(model)
        sampling.append(samp)
    return Task(id=task_id, messages=messages, responses=texts, models=models, sampling=sampling)


def load_tasks(path: str | Path) -> list[Task]:
    """Read and validate a task JSONL file (blank lines are ignored; ids must be unique)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: task file not found")
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON: {e.msg} (column {e.colno})") from None
        try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 file or database can hold
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path}:{line_no}: lone surrogate escape (like \\ud800) in a string: not valid Unicode") from None
        task = parse_task(obj, path, line_no)
        if task.id in first_line:
            raise _err(path, line_no, "id", f"duplicate task id {task.id!r} (first on line {first_line[task.id]})")
        first_line[task.id] = line_no
        tasks.append(task)
    return tasks
