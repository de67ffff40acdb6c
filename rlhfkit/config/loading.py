"""YAML + `--field value` overrides -> a validated config; errors name file, line and field; `config-doc`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .base import ConfigError


T = TypeVar("T", bound=BaseModel)


def _line_of(path: Path, text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at `loc`, to point errors at the right place."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0][1]
            line = match[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(err: ValidationError, source: str, text: str | None, path: Path | None) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        where = source
        if text is not None and path is not None:
            line = _line_of(path, text, e["loc"])
            if line:
                where = f"{source}:{line}"
        lines.append(f"{where}: field '{field}': {e['msg']}")
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--a.b value --flag` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --field value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag switches a boolean on
        i += 1
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, nested dicts merged key by key (YAML, then CLI overrides)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Read `path` (YAML, may be None for all defaults), apply overrides, validate into `cls`."""
    text, data, source = None, {}, "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: field '<root>': a config file is a mapping of field: value")
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    try:
        return cls.model_validate(merge_dicts(data, extra))
    except ValidationError as e:
        # Errors in overridden fields point at the command line, the rest at the file.
        raise ConfigError(_format_errors(e, source, text, Path(path) if path else None)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """One line per field: `name: default  # docstring`, nested sections expanded (with the values of the
    section's default instance, e.g. `GenerationSettings(top_p=1.0)`, when it has one)."""
    out = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"{prefix}{name}:  # {' '.join((field.description or '').split())}")
            nested = getattr(defaults, name) if defaults is not None else field.default
            out.extend(describe(ann, prefix + "  ", nested if isinstance(nested, BaseModel) else None))
            continue
        default = getattr(defaults, name) if defaults is not None else field.default
        default = default.model_dump() if isinstance(default, BaseModel) else default
        doc = " ".join((field.description or "").split())
        out.append(f"{prefix}{name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}")
    return out
