"""The online front on Ray Serve: the batch job's engine behind an OpenAI-shaped images API.

Wiring only. Everything that decides what an image is comes from the modules the batch
job uses: an HTTP body becomes a raw row and goes through the same
:class:`~pipeline.validate.Validator` (spec defaults, limits, seed derivation, request id);
images are made and encoded by the same :class:`~pipeline.batch.GenerateStage` (resident
:class:`~pipeline.engine.Engine`\ s, built in the replica, never pickled from the driver;
it runs :func:`~pipeline.stages.generate_table`). So a request and the equivalent
prompt-table row get the same request id, seed and image bytes.

HTTP contract (``POST {route_prefix}v1/images/generations``):

- body: ``prompt`` (required), ``n`` (-> ``num_images``), ``size`` (``"WIDTHxHEIGHT"``),
  ``response_format`` (only ``b64_json``, also the default), and the extensions ``seed``,
  ``negative_prompt``, ``steps``, ``guidance_scale``, ``max_sequence_length``, ``lora``,
  ``lora_scale`` and ``id``. ``model`` names one of the spec's models (as a prompt
  table's ``model`` column does; ``GET /v1/models`` lists them); ``user`` is accepted for
  OpenAI clients. Any other field is an error. Absent fields take the spec's ``defaults``.
- identity: with ``id``, the row identity is ``id:<id>``, exactly that of a batch row whose
  ``input.id_column`` holds ``<id>``. Without it, the id is :func:`default_id` of the prompt
  (``prompt-`` + 16 hex digits of its SHA-256): the same prompt always gets the same
  derived seed, so the same request gives the same image (send ``seed`` for another), and
  a batch row with that id reproduces it.
- answer: ``{"created": unix_seconds, "data": [...]}``, one item per image with
  ``b64_json`` plus ``request_id``, ``seed`` and the parameters and metadata of the batch
  job's images table, and ``batch_size`` (the images in the Serve batch this image was
  made in) and ``bucket_size`` (those sharing its diffusers call).
- errors: 400 with ``{"error": {"message", "type", "param", "errors": [...]}}`` naming each
  bad field as the client spelled it (``n``, ``size``...), or a body that is not JSON; 500 when generation fails; 503
  with ``Retry-After`` from Serve's proxy when more than ``serve.max_queued_requests``
  requests wait for a replica.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations
# (`request: Request`) at runtime, and Serve's ingress rebuilds those methods where
# string annotations no longer resolve.

import asyncio
import base64
import hashlib
import json
import re
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

import pyarrow as pa
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from pipeline import schema as S
from pipeline.batch import GenerateStage, actor_gpus, connect, engine_catalog
from pipeline.batching import group_by_bucket
from pipeline.catalog import Catalog, build_catalog
from pipeline.config import InputConfig, JobSpec, load_spec
from pipeline.errors import ImagegenError
from pipeline.stages import to_generation_requests
from pipeline.validate import PROBLEMS, REQUEST_SCHEMA, Validator

APP_NAME = "imagegen"
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

api = FastAPI(title="imagegen", description="OpenAI-shaped image generation on the imagegen engine.")


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


def _error(status: int, kind: str, problems: list[tuple[Optional[str], str]]) -> JSONResponse:
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


def _image_item(row: dict[str, Any]) -> dict[str, Any]:
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


@serve.deployment(name="ImageServer")
@serve.ingress(api)
class ImageServer:
    """One replica: a resident engine, the spec's validator, and a dynamic batch of images.

    Each HTTP request is validated on arrival and fans out into one batch item per image;
    concurrent requests' images are batched together (up to ``serve.max_batch_size``,
    waiting at most ``serve.batch_wait_timeout_s``) and the engine splits a batch into
    uniform diffusers calls by bucket key, as in the batch job.
    """

    def __init__(self, spec: JobSpec, catalog: Catalog):
        self.spec = spec
        self.catalog = catalog
        self.validator = Validator(serving_spec(spec), catalog)
        self.stage = GenerateStage(spec, catalog)
        self.started = int(time.time())
        self._generate.set_max_batch_size(spec.serve.max_batch_size)
        self._generate.set_batch_wait_timeout_s(spec.serve.batch_wait_timeout_s)

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, "invalid_request_error", [(None, f"the request body is not valid JSON: {exc}")])
        try:
            requests = validate_request(self.validator, body)
        except RequestError as exc:
            return _error(400, "invalid_request_error", exc.problems)
        rows = await asyncio.gather(*(self._generate(r) for r in requests))
        failed = [r for r in rows if r.get(S.ERROR_STAGE)]
        if failed:
            return _error(
                500,
                "generation_error",
                [(None, f"image {r[S.IMAGE_INDEX]} ({r[S.REQUEST_ID]}): {r[S.ERROR_TYPE]}: {r[S.ERROR_MESSAGE]}") for r in failed],
            )
        return JSONResponse({"created": int(time.time()), "data": [_image_item(r) for r in rows]})

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "imagegen",
                    "ref": entry.config.ref,
                    "fingerprint": entry.fingerprint,
                    "family": entry.family.name,
                    "pipeline_class": entry.pipeline_class,
                    "default": name == self.catalog.default_model,
                    "loaded": name in self.stage.models.resident,
                }
                for name, entry in self.catalog.models.items()
            ],
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        default = self.catalog.models[self.catalog.default_model]
        return {"status": "ok", "model": default.name, "model_fingerprint": default.fingerprint}

    # The decorator needs literals; __init__ replaces them with the spec's serve settings.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Off the event loop, so requests keep being validated and queued for the next
        # batch while this one is on the engine. One batch at a time (Serve's default).
        return await asyncio.to_thread(self._generate_now, requests)

    def _generate_now(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        table = pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)
        pending, engine_requests, _ = to_generation_requests(table)
        bucket_size = [0] * len(requests)
        for group in group_by_bucket(engine_requests):
            for member in group:
                bucket_size[pending[member]] = len(group)
        table = self.stage(table)
        rows = table.to_pylist()
        for row, size in zip(rows, bucket_size):
            row["batch_size"] = len(requests)
            row["bucket_size"] = size
        return rows


def build_app(spec: JobSpec) -> Application:
    """The Serve application for ``spec``: replicas, batching, back-pressure and
    autoscaling from ``spec.serve``, replica resources from ``spec.runtime`` (as the batch
    job's engine actors). Needs a connected Ray when ``model.device`` is ``auto``."""
    sv, rt = spec.serve, spec.runtime
    gpus = actor_gpus(spec)
    catalog = engine_catalog(build_catalog(spec), gpus)
    deployment = ImageServer.options(
        max_ongoing_requests=sv.max_ongoing_requests,
        max_queued_requests=sv.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=sv.retry_after_s),
        autoscaling_config=AutoscalingConfig(
            min_replicas=sv.min_replicas,
            initial_replicas=max(1, sv.min_replicas),
            max_replicas=sv.max_replicas,
            target_ongoing_requests=sv.target_ongoing_requests,
        ),
        ray_actor_options={"num_cpus": rt.cpus_per_actor, "num_gpus": gpus},
    )
    # The batch job's own engine actor class: same thread count, so CPU pixels match exactly.
    return deployment.bind(spec, catalog)


class AppArgs(BaseModel):
    """Arguments of :func:`app_builder` in a Serve config file (``args:``)."""

    model_config = ConfigDict(extra="forbid")

    spec: str
    overrides: list[str] = Field(default_factory=list)


def app_builder(args: dict[str, Any]) -> Application:
    """Application builder for ``serve deploy`` / ``serve run``: ``args`` is
    ``{"spec": path, "overrides": ["key.path=value", ...]}`` (see ``jobs/serve_config.yaml``).

    The config file's ``http_options`` and ``route_prefix`` apply there; the spec's
    ``serve.host``, ``serve.port`` and ``serve.route_prefix`` only apply to ``imagegen serve``.
    """
    parsed = AppArgs.model_validate(args)
    return build_app(load_spec(parsed.spec, parsed.overrides))


def start(spec: JobSpec, name: str = APP_NAME) -> str:
    """Deploy ``spec``'s app on the connected Ray, listening on ``serve.host:serve.port``
    under ``serve.route_prefix``; return its base URL once the app is running.

    HTTP options take effect only when Serve is not running yet on the cluster: a second
    app shares the first one's proxy.
    """
    sv = spec.serve
    serve.start(http_options={"host": sv.host, "port": sv.port})
    serve.run(build_app(spec), name=name, route_prefix=sv.route_prefix)
    host = f"[{sv.host}]" if ":" in sv.host else sv.host
    return f"http://{host}:{sv.port}{sv.route_prefix.rstrip('/')}"


def serve_until_interrupted(spec: JobSpec, announce: Callable[[str], None] = print) -> None:
    """``imagegen serve``: connect to Ray as the batch job does (a new local Ray unless
    ``runtime.address`` names one), deploy, block until Ctrl-C or SIGTERM, then shut down:
    this app is deleted, Serve is shut down when no other app is left on it, and the Ray
    connection is closed (which stops a local Ray this process started).
    """
    if spec.runtime.address is None:
        _check_port_free(spec.serve.host, spec.serve.port)
    connect(spec.runtime)
    stop = threading.Event()
    previous = _on_sigterm(stop.set)
    try:
        url = start(spec)
        announce(f"serving {', '.join(spec.named_models())} at {url}/v1/images/generations (Ctrl-C to stop)")
        # A bounded wait keeps Ctrl-C responsive: the main thread sees KeyboardInterrupt
        # between waits on every platform.
        while not stop.wait(timeout=1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        announce("shutting down")
        try:
            serve.delete(APP_NAME)
            if not serve.status().applications:
                serve.shutdown()
        finally:
            ray.shutdown()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _on_sigterm(callback: Callable[[], None]):
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: callback())


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy retries a taken port in the background instead of failing; find out here.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ImagegenError(
                f"cannot listen on {host}:{port}: {exc.strerror}; set serve.port (or serve.host) to a free one, "
                f"e.g. --set serve.port={port + 1}"
            ) from None
