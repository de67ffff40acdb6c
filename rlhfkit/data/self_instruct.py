"""Self-Instruct user-oriented instructions: {"instruction", "instances": [{"input", "output"}]}."""

from collections import Counter
from typing import Iterator

from .containers import objects, report
from .records import DataError, Demonstration, ReadStats, _get, _Invalid, _json_type, _optional_string, _string


def read_self_instruct(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """One demonstration per instance; the prompt is the instruction, then the input (if any)
    after a blank line."""
    return list(iter_self_instruct(path, stats=stats))


def iter_self_instruct(path, *, stats: ReadStats | None = None) -> Iterator[Demonstration]:
    """`read_self_instruct`, one record at a time."""
    count, line_no = 0, 1
    for line_no, obj in objects(path):
        demos = []
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
        count += len(demos)
        yield from demos  # a line's instances go out once the whole line is checked, as before
    report(path, "demonstrations", count, Counter(), stats, line_no)
