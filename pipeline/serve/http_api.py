"""The images API's HTTP side, without Serve: an OpenAI-shaped body -> the raw row the
batch job would read for it (then the same Validator), a generated row -> the response
item, and OpenAI's error body. Kept apart from the deployment so it can be read and
tested without a cluster."""

from __future__ import annotations

import base64
import hashlib
import json
import re
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
_ACCEPTED_FIELDS = frozenset({*_BODY_TO_ROW, "size", "response_format", "id", "user"})
# Row columns that the API names differently.
_ROW_TO_BODY = {"num_images": "n", "width": "size", "height": "size"}
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")



class RequestError(ValueError):
    """An HTTP request that cannot be served as sent; ``problems`` are ``(field, message)``."""

    def __init__(self, problems: list[tuple[Optional[str], str]]):
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def default_id(prompt: Any) -> str:
    """The ``id`` of a request that sends none: ``prompt-`` + 16 hex digits of the SHA-256
    of the prompt text (of its JSON form when it is not text, which validation rejects)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return "prompt-" + hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def serving_spec(spec: JobSpec) -> JobSpec:
    """``spec`` as the online front validates against: its model, defaults and limits, with
    the input section replaced by the HTTP field names (:data:`HTTP_INPUT`)."""
    return spec.model_copy(update={"input": HTTP_INPUT})


def body_to_row(body: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Optional[str], str]]]:
    """An images-API body -> the raw row the batch job would read for it, and the problems
    that are HTTP's own (unknown fields, ``size`` syntax, ``response_format``, the type of
    ``id``). Every generation parameter, the model among them, is left to the Validator."""
    problems: list[tuple[Optional[str], str]] = []
    for name in sorted(set(body) - _ACCEPTED_FIELDS):
        problems.append((name, f"{name}: unknown field; allowed: {', '.join(sorted(_ACCEPTED_FIELDS))}"))
    if body.get("response_format") not in (None, "b64_json"):
        problems.append(("response_format", f"response_format: only 'b64_json' is supported, got {body['response_format']!r}"))

    row: dict[str, Any] = {S.INPUT_SOURCE: HTTP_SOURCE, S.INPUT_ROW: 0, "prompt": body.get("prompt")}
    for field, column in _BODY_TO_ROW.items():
        if body.get(field) is not None:
            row[column] = body[field]
    size = body.get("size")
    if size is not None:
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            problems.append(("size", f"size: must be 'WIDTHxHEIGHT', for example '512x512', got {size!r}"))
        else:
            row["width"], row["height"] = int(match.group(1)), int(match.group(2))
    identity = body.get("id")
    if identity is None:
        row["id"] = default_id(body.get("prompt"))
    elif isinstance(identity, bool) or not isinstance(identity, (str, int)):
        problems.append(("id", f"id: must be text or a whole number, got {identity!r}"))
        row["id"] = default_id(body.get("prompt"))
    else:
        row["id"] = identity
    return row, problems


def validate_request(validator: Validator, body: Any) -> list[dict[str, Any]]:
    """An images-API body -> one validated request per image, made by the batch job's
    ``validate_row``. Raises :class:`RequestError` naming every bad field, HTTP's and the
    Validator's together."""
    if not isinstance(body, dict):
        raise RequestError([(None, f"the request body must be a JSON object, got {type(body).__name__}")])
    row, problems = body_to_row(body)
    requests = validator.validate_row(row)
    if requests[0].get(S.ERROR_STAGE):
        problems += [_as_body_problem(column, message) for column, message in requests[0][PROBLEMS]]
    if problems:
        raise RequestError(problems)
    return requests


def _as_body_problem(column: Optional[str], message: str) -> tuple[Optional[str], str]:
    """A validator problem about a row column -> the same problem named by its body field."""
    field = _ROW_TO_BODY.get(column, column) if column else None
    return field, (message if field == column else f"{field}: {message}")


def error(status: int, kind: str, problems: list[tuple[Optional[str], str]]) -> JSONResponse:
    """OpenAI's error shape, plus every problem when there is more than one."""
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": "; ".join(message for _, message in problems),
                "type": kind,
                "param": problems[0][0],
                "code": None,
                "errors": [{"param": field, "message": message} for field, message in problems],
            }
        },
    )


def image_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "b64_json": base64.b64encode(row[S.IMAGE]["bytes"]).decode("ascii"),
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
