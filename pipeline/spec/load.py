"""Building a :class:`~pipeline.spec.config.JobSpec`: YAML, ``--set`` overrides, and
pydantic's errors turned into one message that names each bad field and what is allowed."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import SpecError
from pipeline.spec.config import JobSpec


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate plain data as a :class:`JobSpec`, turning pydantic's errors into one
    :class:`SpecError` that names each bad field, what was given, and what is allowed."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a YAML mapping with sections input, model, defaults, limits, output, runtime")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise SpecError(f"{source} is not a valid job spec:\n" + "\n".join(f"  - {line}" for line in lines)) from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent, _, name = loc.rpartition(".")
        allowed = _fields_at(parent)
        return f"{loc}: unknown field {name!r}; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    message = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    if isinstance(given, (str, int, float, bool)) and not (err["type"] == "value_error" and loc.count(".") == 0):
        return f"{loc}: {message} (got {given!r})"
    return f"{loc}: {message}"


def _fields_at(path: str) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in filter(None, path.split(".")):
        if part.isdigit():  # an index into a list of sections (plan.throughput.0)
            continue
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is list:
            (annotation,) = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Union:  # an optional section (scoring)
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``8`` is an int)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key.path=value, for example --set runtime.num_actors=2")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


def load_spec(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job spec, apply ``--set`` overrides, and validate it.

    Raises :class:`SpecError` for a missing file, bad YAML, or any invalid field.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(f"job spec {str(path)!r} does not exist; pass the path of a YAML file such as jobs/demo.yaml") from None
    except OSError as exc:
        raise SpecError(f"job spec {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise SpecError(f"job spec {str(path)!r} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    return parse_spec(data, source=str(path))
