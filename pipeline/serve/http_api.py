"""The images API's HTTP side, without Serve: an OpenAI-shaped body -> the raw row the
batch job would read for it (then the same Validator), with every field of OpenAI's
``images.generate`` either honoured or accepted and ignored, a generated row -> the
response item, and OpenAI's error body. Kept apart from the deployment so it can be read and
tested without a cluster."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi.responses import JSONResponse

from pipeline.spec import schema as S
from pipeline.spec.config import InputConfig, JobSpec
from pipeline.spec.validate import PROBLEMS, Validator

HTTP_SOURCE = "http"

# HTTP bodies name parameters as the API does, whatever the spec's input mapping says, and
# always carry an identity column: the row identity is then `id:<id>`, as in a batch job
# with `input.id_column` set. The URL is never read.
HTTP_INPUT = InputConfig(url="http://imagegen.invalid/requests", format="jsonl", prompt_column="prompt", id_column="id")

# Body field -> raw-row column (the Validator's parameter names).
_BODY_TO_ROW = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "n": "num_images",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "max_sequence_length": "max_sequence_length",
    "model": "model",
    "lora": "lora",
    "lora_scale": "lora_scale",
}
# OpenAI's enumerated fields and the values its API takes (openai-python's
# ImageGenerateParams); a value outside these is a 400 naming the allowed ones.
OPENAI_CHOICES: dict[str, tuple[str, ...]] = {
    "response_format": ("b64_json", "url"),
    "background": ("auto", "opaque", "transparent"),
    "moderation": ("auto", "low"),
    "style": ("vivid", "natural"),
    "quality": ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"),
    "output_format": ("png", "webp", "jpeg", "gif", "svg"),
    "complexity": ("low", "medium", "high"),
}
# Values OpenAI takes that this front cannot make, and what to send instead.
_CANNOT = {
    ("response_format", "url"): "response_format: 'url' is not supported (images are not stored by the front); use 'b64_json' (the default)",
    ("background", "transparent"): "background: 'transparent' is not supported (the models make opaque images); use 'auto' or 'opaque'",
    ("output_format", "gif"): "output_format: 'gif' is not supported; use 'png', 'webp' or 'jpeg'",
    ("output_format", "svg"): "output_format: 'svg' is not supported; use 'png', 'webp' or 'jpeg'",
}
# OpenAI fields accepted and ignored: they change nothing these models can do (README, Serve).
IGNORED_FIELDS = frozenset({"user", "safety_identifier", "style", "moderation", "complexity", "partial_images", "frame_duration_ms", "svg"})
_ACCEPTED_FIELDS = frozenset({*_BODY_TO_ROW, *OPENAI_CHOICES, *IGNORED_FIELDS, "size", "id", "output_compression", "stream", "frame_count"})
# Row columns that the API names differently.
_ROW_TO_BODY = {"num_images": "n", "width": "size", "height": "size"}
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# An images body is an object of scalars (and the odd list): deeper is no request, and a
# bound keeps every later walk (hashing, messages) far from Python's recursion limit.
MAX_BODY_DEPTH = 16


@dataclass(frozen=True)
class Encoding:
    """How a request's images are encoded (``output_format``, ``output_compression``)."""

    format: str
    quality: int


@dataclass
class ParsedBody:
    """An images-API body as the front uses it: the raw row for the Validator, the
    encoding of its images, the ``quality`` to echo, and the problems found so far."""

    row: dict[str, Any]
    encoding: Encoding
    quality: Optional[str] = None
    problems: list[tuple[Optional[str], str]] = field(default_factory=list)


class RequestError(ValueError):
    """An HTTP request that cannot be served as sent; ``problems`` are ``(field, message)``."""

    def __init__(self, problems: list[tuple[Optional[str], str]]):
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def parse_json_body(raw: bytes) -> Any:
    """A request body -> its JSON value, or :class:`RequestError` saying what is wrong with
    it: not UTF-8, not JSON, ``NaN``/``Infinity`` or a number too large for a float (JSON has
    neither), nesting deeper than :data:`MAX_BODY_DEPTH`, or text that is not Unicode (a
    lone surrogate such as ``"\\ud800"``, which no encoder can write). Each problem names
    the top-level field it is in."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError([(None, f"the request body is not UTF-8 text (byte {exc.start}); send JSON in UTF-8")]) from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_whole_number)
    except RecursionError:
        raise RequestError([(None, f"the request body is nested too deeply; at most {MAX_BODY_DEPTH} levels")]) from None
    except ValueError as exc:  # JSONDecodeError, or a number the hooks below refuse
        raise RequestError([(None, f"the request body is not valid JSON: {exc}")]) from None
    problems = _value_problems(body)
    if problems:
        raise RequestError(problems)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _whole_number(text: str) -> int:
    # Python refuses to read integers of over 4300 digits with a message about its own
    # settings; no field takes anything near this long.
    if len(text.lstrip("-")) > 64:
        raise ValueError(f"a whole number of {len(text.lstrip('-'))} digits is beyond the range of numbers this API takes")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of numbers this API takes")
    return value


def _value_problems(body: Any) -> list[tuple[Optional[str], str]]:
    """Text that is not Unicode, and nesting past :data:`MAX_BODY_DEPTH`, in ``body``; each
    named by its top-level field. Iterative: a body is not trusted to be shallow."""
    problems: dict[Optional[str], str] = {}
    stack: list[tuple[Any, Optional[str], int]] = [(body, None, 0)]
    while stack:
        value, name, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            problems.setdefault(name, f"{name or 'the request body'}: nested too deeply; at most {MAX_BODY_DEPTH} levels")
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                field_name = name if depth else key
                if _not_unicode(key):
                    problems.setdefault(None, f"a field name is not Unicode text: {_surrogate_message(key)}")
                    field_name = None
                stack.append((item, field_name, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, name, depth + 1) for item in value)
        elif isinstance(value, str) and _not_unicode(value):
            problems.setdefault(name, f"{name or 'the request body'}: not Unicode text: {_surrogate_message(value)}")
    return sorted(problems.items(), key=lambda item: item[0] or "")


def _not_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_message(text: str) -> str:
    at = next(i for i, char in enumerate(text) if 0xD800 <= ord(char) <= 0xDFFF)
    return f"a lone surrogate (U+{ord(text[at]):04X}) at character {at}; escape only whole characters (a pair \\ud83d\\ude00 is fine)"


def default_id(prompt: Any) -> str:
    """The ``id`` of a request that sends none: ``prompt-`` + 16 hex digits of the SHA-256
    of the prompt text (of its JSON form when it is not text, which validation rejects)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return "prompt-" + hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def serving_spec(spec: JobSpec) -> JobSpec:
    """``spec`` as the online front validates against: its model, defaults and limits, with
    the input section replaced by the HTTP field names (:data:`HTTP_INPUT`)."""
    return spec.model_copy(update={"input": HTTP_INPUT})


def parse_body(body: dict[str, Any], spec: JobSpec) -> ParsedBody:
    """An images-API body -> the raw row the batch job would read for it, the encoding of
    its images, and the problems that are HTTP's own (unknown fields, OpenAI values this
    front cannot make, ``size`` syntax, the type of ``id``). Every generation parameter, the
    model among them, is left to the Validator."""
    problems: list[tuple[Optional[str], str]] = []
    for name in sorted(set(body) - _ACCEPTED_FIELDS):
        problems.append((name, f"{name}: unknown field; allowed: {', '.join(sorted(_ACCEPTED_FIELDS))}"))
    for name, allowed in OPENAI_CHOICES.items():
        value = body.get(name)
        if value is None:
            continue
        if value not in allowed:
            problems.append((name, f"{name}: must be one of {', '.join(allowed)}, got {value!r}"))
        elif (name, value) in _CANNOT:
            problems.append((name, _CANNOT[name, value]))
    if body.get("stream") not in (None, False):
        problems.append(("stream", "stream: streaming is not supported; omit stream (or send false) for one JSON answer"))
    if body.get("frame_count") not in (None, 1):
        problems.append(("frame_count", f"frame_count: only still images (1) are made, got {body['frame_count']!r}"))

    row: dict[str, Any] = {S.INPUT_SOURCE: HTTP_SOURCE, S.INPUT_ROW: 0, "prompt": body.get("prompt")}
    for name, column in _BODY_TO_ROW.items():
        if body.get(name) is not None:
            row[column] = body[name]
    size = body.get("size")
    if size is not None and size != "auto":  # auto: the spec's default size
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            problems.append(("size", f"size: must be 'WIDTHxHEIGHT', for example '512x512', or 'auto', got {size!r}"))
        else:
            row["width"], row["height"] = int(match.group(1)), int(match.group(2))
    quality = body.get("quality")
    preset = spec.serve.quality_steps.get(quality) if isinstance(quality, str) else None
    if preset is not None:
        if body.get("steps") is not None:
            problems.append(("quality", f"quality: {quality!r} sets steps={preset} (serve.quality_steps); send quality or steps, not both"))
        row["steps"] = preset
    identity = body.get("id")
    if identity is None:
        row["id"] = default_id(body.get("prompt"))
    elif isinstance(identity, bool) or not isinstance(identity, (str, int)):
        problems.append(("id", f"id: must be text or a whole number, got {identity!r}"))
        row["id"] = default_id(body.get("prompt"))
    else:
        row["id"] = identity
    encoding, problem = _encoding(body, spec)
    if problem:
        problems.append(problem)
    return ParsedBody(row, encoding, quality if quality in OPENAI_CHOICES["quality"] and quality != "auto" else None, problems)


def _encoding(body: dict[str, Any], spec: JobSpec) -> tuple[Encoding, Optional[tuple[str, str]]]:
    """``output_format`` (else the spec's ``output.format``) and ``output_compression``
    (0-100, higher is better quality, as OpenAI's default of 100; else ``output.quality``).
    PNG is lossless: its compression is accepted and ignored."""
    fmt = body.get("output_format")
    fmt = fmt if fmt in ("png", "webp", "jpeg") else spec.output.format
    compression = body.get("output_compression")
    if compression is None:
        return Encoding(fmt, spec.output.quality), None
    if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
        return Encoding(fmt, spec.output.quality), ("output_compression", f"output_compression: must be a whole number from 0 to 100, got {compression!r}")
    return Encoding(fmt, compression if fmt != "png" else spec.output.quality), None


def validate_request(validator: Validator, spec: JobSpec, body: Any) -> tuple[list[dict[str, Any]], ParsedBody]:
    """An images-API body -> one validated request per image, made by the batch job's
    ``validate_row``, and the parsed body (encoding, echoed quality). Raises
    :class:`RequestError` naming every bad field, HTTP's and the Validator's together."""
    if not isinstance(body, dict):
        raise RequestError([(None, f"the request body must be a JSON object, got {type(body).__name__}")])
    parsed = parse_body(body, spec)
    problems = list(parsed.problems)
    requests = validator.validate_row(parsed.row)
    if requests[0].get(S.ERROR_STAGE):
        problems += [_as_body_problem(column, message) for column, message in requests[0][PROBLEMS]]
    if problems:
        raise RequestError(problems)
    return requests, parsed


def _as_body_problem(column: Optional[str], message: str) -> tuple[Optional[str], str]:
    """A validator problem about a row column -> the same problem named by its body field.
    (Steps a ``quality`` preset sets are within the limits: the spec is checked at load.)"""
    name = _ROW_TO_BODY.get(column, column) if column else None
    return name, (message if name == column else f"{name}: {message}")


def error(
    status: int,
    kind: str,
    problems: list[tuple[Optional[str], str]],
    code: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    """OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``, which the
    openai SDK turns into its exceptions), plus ``errors``: every problem, when there are
    several."""
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {
                "message": "; ".join(message for _, message in problems),
                "type": kind,
                "param": problems[0][0],
                "code": code,
                "errors": [{"param": name, "message": message} for name, message in problems],
            }
        },
    )


def images_response(rows: list[dict[str, Any]], parsed: ParsedBody, created: int) -> dict[str, Any]:
    """The answer to an images request: OpenAI's ``ImagesResponse`` (``created``, ``data``
    with ``b64_json``, ``background``, ``output_format``, ``quality``, ``size``) with the
    batch job's metadata in each item."""
    first = rows[0]
    return {
        "created": created,
        "data": [image_item(r) for r in rows],
        "background": "opaque",
        "output_format": parsed.encoding.format,
        "quality": parsed.quality,
        "size": f"{first[S.WIDTH]}x{first[S.HEIGHT]}",
    }


def image_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "b64_json": base64.b64encode(row[S.IMAGE]["bytes"]).decode("ascii"),
        "url": None,
        "revised_prompt": None,
        "request_id": row[S.REQUEST_ID],
        "id": row[S.ID],
        "image_index": row[S.IMAGE_INDEX],
        "seed": row[S.SEED],
        "width": row[S.WIDTH],
        "height": row[S.HEIGHT],
        "steps": row[S.STEPS],
        "guidance_scale": row[S.GUIDANCE_SCALE],
        "negative_prompt": row[S.NEGATIVE_PROMPT],
        "scheduler": row[S.SCHEDULER],
        "model": row[S.MODEL],
        "model_fingerprint": row[S.MODEL_FINGERPRINT],
        "model_family": row[S.MODEL_FAMILY],
        "pipeline_class": row[S.PIPELINE_CLASS],
        "max_sequence_length": row[S.MAX_SEQUENCE_LENGTH],
        "lora": row[S.LORA],
        "lora_scale": row[S.LORA_SCALE],
        "lora_digest": row[S.LORA_DIGEST],
        "format": row[S.IMAGE_FORMAT],
        "sha256": row[S.SHA256],
        "generation_seconds": row[S.GENERATION_SECONDS],
        "prompt_tokens": row[S.PROMPT_TOKENS],
        "prompt_truncated": row[S.PROMPT_TRUNCATED],
        "batch_size": row["batch_size"],
        "bucket_size": row["bucket_size"],
        "replica": row[S.ACTOR_ID],
    }
