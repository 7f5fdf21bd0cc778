"""The online front on Ray Serve: the batch job's engine behind an OpenAI-shaped images API.

Wiring only. Everything that decides what an image is comes from the modules the batch
job uses: an HTTP body becomes a raw row and goes through the same
:class:`~pipeline.spec.validate.Validator` (spec defaults, limits, seed derivation, request id);
images are made and encoded by the same :class:`~pipeline.job.actors.GenerateStage` (resident
:class:`~pipeline.engine.engine.Engine`\ s, built in the replica, never pickled from the driver;
it runs :func:`~pipeline.engine.stages.generate_table`). So a request and the equivalent
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
import json
import signal
import socket
import threading
import time
from typing import Any, Callable

import pyarrow as pa
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from pipeline.engine.resolve import build_catalog
from pipeline.engine.stages import to_generation_requests
from pipeline.errors import ImagegenError
from pipeline.job.actors import GenerateStage, actor_gpus, engine_catalog
from pipeline.job.connect import connect
from pipeline.serve.http_api import RequestError, error, image_item, serving_spec, validate_request
from pipeline.spec import schema as S
from pipeline.spec.batching import group_by_bucket
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec
from pipeline.spec.load import load_spec
from pipeline.spec.validate import REQUEST_SCHEMA, Validator

APP_NAME = "imagegen"
api = FastAPI(title="imagegen", description="OpenAI-shaped image generation on the imagegen engine.")


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
            return error(400, "invalid_request_error", [(None, f"the request body is not valid JSON: {exc}")])
        try:
            requests = validate_request(self.validator, body)
        except RequestError as exc:
            return error(400, "invalid_request_error", exc.problems)
        rows = await asyncio.gather(*(self._generate(r) for r in requests))
        failed = [r for r in rows if r.get(S.ERROR_STAGE)]
        if failed:
            return error(
                500,
                "generation_error",
                [(None, f"image {r[S.IMAGE_INDEX]} ({r[S.REQUEST_ID]}): {r[S.ERROR_TYPE]}: {r[S.ERROR_MESSAGE]}") for r in failed],
            )
        return JSONResponse({"created": int(time.time()), "data": [image_item(r) for r in rows]})

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
