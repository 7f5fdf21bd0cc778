"""The online front on Ray Serve: the batch job's engine behind an OpenAI-shaped images API.

Wiring only. Everything that decides what an image is comes from the modules the batch
job uses: an HTTP body becomes a raw row and goes through the same
:class:`~pipeline.spec.validate.Validator` (spec defaults, limits, seed derivation, request id);
images are made and encoded by the same :class:`~pipeline.batch.engine_actors.ActorEngines` (resident
:class:`~pipeline.engine.engine.Engine`\ s, built in the replica, never pickled from the driver;
it runs :func:`~pipeline.engine.table_generation.generate_table`). So a request and the equivalent
prompt-table row get the same request id, seed and image bytes.

HTTP contract (``POST {route_prefix}v1/images/generations``): every field of OpenAI's
``images.generate`` is accepted, each honoured or ignored as :mod:`.http_api` says (and
the README, field by field), plus the extensions ``seed``, ``negative_prompt``, ``steps``,
``guidance_scale``, ``max_sequence_length``, ``lora``, ``lora_scale`` and ``id``.

- identity: with ``id``, the row identity is ``id:<id>``, exactly that of a batch row whose
  ``input.id_column`` holds ``<id>``. Without it, the id is :func:`default_id` of the prompt
  (``prompt-`` + 16 hex digits of its SHA-256): the same prompt always gets the same
  derived seed, so the same request gives the same image (send ``seed`` for another), and
  a batch row with that id reproduces it.
- answer: OpenAI's ``ImagesResponse``, one item per image with ``b64_json`` plus
  ``request_id``, ``seed`` and the parameters and metadata of the batch job's images table,
  and ``batch_size`` (the images in the Serve batch this image was made in) and
  ``bucket_size`` (those sharing its diffusers call).
- keys: with ``serve.api_keys_file`` / ``api_keys_env``, every route but ``/healthz``
  needs ``Authorization: Bearer KEY`` (401 otherwise), and only ``application/json``
  bodies are read (415 otherwise): :mod:`.gate`, in front of every route.
- a request is owned by its connection (:mod:`.in_flight`): a client that goes away takes
  its images that have not started with it; those on the engine are discarded when their
  call returns, and until then the request counts (``/healthz``, admission, the drain).
- errors: OpenAI's body ``{"error": {"message", "type", "param", "code", "errors": [...]}}``:
  400 naming each bad field as the client spelled it (``n``, ``size``...), or a body that
  is not JSON (or not Unicode text); 401 without a valid key; 404/405 for other routes;
  413 for a body longer than ``serve.max_body_bytes``; 415 for other body types; 429 with ``Retry-After`` past
  ``serve.max_ongoing_requests_per_key``; 500 when generation fails (or on a bug: never a
  plain-text answer); 503 while ``imagegen serve`` shuts down (:mod:`.drain`), and 503 with
  ``Retry-After`` from Serve's proxy when more than ``serve.max_queued_requests``
  requests wait for a replica (that body is Serve's).
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations
# (`request: Request`) at runtime, and Serve's ingress rebuilds those methods where
# string annotations no longer resolve.

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any, Optional

import pyarrow as pa
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.engine.resolve_catalog import build_catalog
from pipeline.engine.table_generation import ImageEncoder, generate_table, to_generation_requests
from pipeline.batch.engine_actors import ActorEngines, actor_gpus, engine_catalog
from pipeline.serve.auth import KeyCheck, check_exposure, load_key_digests
from pipeline.serve.drain import DrainClient
from pipeline.serve.gate import Gate
from pipeline.serve.http_api import Encoding, RequestError, error, images_response, parse_json_body, serving_spec, validate_request
from pipeline.serve.in_flight import InFlight, KeyBusy, Ticket
from pipeline.spec import schema as S
from pipeline.spec.bucketing import group_by_bucket
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec
from pipeline.spec.load import load_spec
from pipeline.spec.validate import REQUEST_SCHEMA, Validator

APP_NAME = "imagegen"
log = logging.getLogger(__name__)
api = FastAPI(title="imagegen", description="OpenAI-shaped image generation on the imagegen engine.")


def _replica_keys() -> KeyCheck:
    return serve.get_replica_context().servable_object.keys


def _replica_max_body() -> int:
    return serve.get_replica_context().servable_object.spec.serve.max_body_bytes


api.add_middleware(Gate, keys=_replica_keys, max_body=_replica_max_body)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods answer in OpenAI's shape too, so SDKs show the message.
    return error(exc.status_code, "invalid_request_error", [(None, f"{request.method} {request.url.path}: {exc.detail}")])


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, "invalid_request_error", [(None, f"{request.method} {request.url.path}: {exc.errors()}")])


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug still answers in OpenAI's shape (SDKs show the message); the trace goes to the log.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error(500, "server_error", [(None, f"the server failed on this request ({type(exc).__name__}); see the server log")])


@serve.deployment(name="ImageServer")
@serve.ingress(api)
class ImageServer:
    """One replica: a resident engine, the spec's validator, and a dynamic batch of images.

    Each HTTP request is validated on arrival and fans out into one batch item per image;
    concurrent requests' images are batched together (up to ``serve.max_batch_size``,
    waiting at most ``serve.batch_wait_timeout_s``) and the engine splits a batch into
    uniform diffusers calls by bucket key, as in the batch job.
    """

    def __init__(self, spec: JobSpec, catalog: Catalog, key_digests: tuple[str, ...] = (), drain: Optional[str] = None):
        self.spec = spec
        self.catalog = catalog
        self.validator = Validator(serving_spec(spec), catalog)
        self.stage = ActorEngines(spec, catalog)
        self.keys = KeyCheck(key_digests)
        self.drain = DrainClient(drain)
        self.in_flight = InFlight(spec.serve.max_ongoing_requests, spec.serve.max_ongoing_requests_per_key)
        self.encoders: dict[Encoding, ImageEncoder] = {Encoding(spec.output.format, spec.output.quality): self.stage.encoder}
        self.started = int(time.time())
        self._generate.set_max_batch_size(spec.serve.max_batch_size)
        self._generate.set_batch_wait_timeout_s(spec.serve.batch_wait_timeout_s)

    def _shutting_down(self) -> JSONResponse:
        return error(
            503,
            "server_error",
            [(None, "the server is shutting down and takes no new requests; retry (another instance, or this one once restarted)")],
            code="server_shutting_down",
            headers={"Retry-After": f"{self.spec.serve.retry_after_s:g}"},
        )

    def _key_busy(self) -> JSONResponse:
        limit = self.spec.serve.max_ongoing_requests_per_key
        return error(
            429,
            "rate_limit_error",
            [(None, f"this API key already has {limit} request(s) in flight (serve.max_ongoing_requests_per_key); retry when one is answered")],
            code="rate_limit_exceeded",
            headers={"Retry-After": f"{self.spec.serve.retry_after_s:g}"},
        )

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        # Counted in the drain from here until the ticket is released, which may be after
        # this handler returns: a client that left still has its running images on the engine.
        if not await self.drain.admit():
            return self._shutting_down()
        try:
            ticket = await self.in_flight.admit(request.state.api_key, on_release=self.drain.done)
        except KeyBusy:
            self.drain.done()
            return self._key_busy()
        except BaseException:
            self.drain.done()
            raise
        try:
            return await self._generations(request, ticket)
        except BaseException:  # cancelled: the client has gone (or a bug): its images that wait will not start
            self.in_flight.abandon(ticket)
            raise
        finally:
            self.in_flight.leave(ticket)

    async def _generations(self, request: Request, ticket: Ticket) -> JSONResponse:
        try:
            body = parse_json_body(await request.body())
            requests, parsed = validate_request(self.validator, self.spec, body)
        except RequestError as exc:
            unknown = any(": unknown field;" in message for _, message in exc.problems)
            return error(400, "invalid_request_error", exc.problems, code="unknown_parameter" if unknown else "invalid_value")
        self.in_flight.queue(ticket, len(requests))
        rows = await asyncio.gather(*(self._generate((r, parsed.encoding, ticket)) for r in requests))
        failed = [r for r in rows if r.get(S.ERROR_STAGE)]
        if failed:
            return error(
                500,
                "server_error",
                [(None, f"image {r[S.IMAGE_INDEX]} ({r[S.REQUEST_ID]}): {r[S.ERROR_TYPE]}: {r[S.ERROR_MESSAGE]}") for r in failed],
                code="generation_failed",
            )
        return JSONResponse(images_response(rows, parsed, int(time.time())))

    @api.get("/v1/models")
    async def models(self) -> Any:
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
    async def healthz(self) -> JSONResponse:
        # Open without a key (gate.OPEN_PATHS): load balancers and probes call it. 503 while
        # draining, so they stop sending requests here. The app-wide count is read before
        # this replica's: a request whose images run here then was already counted there.
        default = self.catalog.models[self.catalog.default_model]
        body: dict[str, Any] = {"status": "ok", "model": default.name, "model_fingerprint": default.fingerprint}
        drain = await self.drain.status()
        if drain is not None:
            body.update(status="draining" if drain["draining"] else "ok", in_flight=drain["in_flight"])
        body["replica"] = asdict(self.in_flight.counts())
        return JSONResponse(body, status_code=503 if body["status"] == "draining" else 200)

    # The decorator needs literals; __init__ replaces them with the spec's serve settings.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate(self, items: list[tuple[dict[str, Any], Encoding, Ticket]]) -> list[Optional[dict[str, Any]]]:
        # Images of clients that have gone are skipped here (None: nobody reads it).
        live = [i for i, (_, _, ticket) in enumerate(items) if self.in_flight.start(ticket)]
        rows: list[Optional[dict[str, Any]]] = [None] * len(items)
        if not live:
            return rows
        try:
            # Off the event loop, so requests keep being validated and queued for the next
            # batch while this one is on the engine. One batch at a time (Serve's default).
            made = await asyncio.to_thread(self._generate_now, [items[i][:2] for i in live])
        finally:
            for i in live:
                self.in_flight.finish(items[i][2])
        for i, row in zip(live, made):
            rows[i] = row
        return rows

    def _generate_now(self, items: list[tuple[dict[str, Any], Encoding]]) -> list[dict[str, Any]]:
        # One engine pass per encoding in the batch: the encoder is per block (as in the
        # batch job), and clients rarely mix formats, so this seldom splits a bucket.
        rows: list[Optional[dict[str, Any]]] = [None] * len(items)
        by_encoding: dict[Encoding, list[int]] = {}
        for index, (_, encoding) in enumerate(items):
            by_encoding.setdefault(encoding, []).append(index)
        for encoding, members in by_encoding.items():
            requests = [items[i][0] for i in members]
            table = pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)
            pending, engine_requests, _ = to_generation_requests(table)
            bucket_size = [0] * len(requests)
            for group in group_by_bucket(engine_requests):
                for member in group:
                    bucket_size[pending[member]] = len(group)
            encoder = self._encoder(encoding)
            done = generate_table(self.stage.models, table, self.stage.actor_id, self.stage.node_id, encoder).to_pylist()
            for i, row, size in zip(members, done, bucket_size):
                row["batch_size"] = len(items)
                row["bucket_size"] = size
                rows[i] = row
        return rows  # type: ignore[return-value]

    def _encoder(self, encoding: Encoding) -> ImageEncoder:
        if encoding not in self.encoders:
            threads = max(1, int(self.spec.runtime.cpus_per_actor))
            # The same scorer (quality columns) as the stage's own encoder: only the encoding differs.
            self.encoders[encoding] = ImageEncoder(encoding.format, encoding.quality, threads, scorer=self.stage.encoder.scorer)
        return self.encoders[encoding]


def build_app(spec: JobSpec, host: Optional[str], drain: Optional[str] = None) -> Application:
    """The Serve application for ``spec``: replicas, batching, back-pressure, autoscaling
    and graceful shutdown from ``spec.serve``, replica resources from ``spec.runtime`` (as
    the batch job's engine actors). Needs a connected Ray when ``model.device`` is ``auto``.

    Reads the API keys here (only their digests go to the replicas) and refuses to serve
    without keys on a ``host`` other machines reach (None: unknown, so reachable) unless
    ``serve.allow_unauthenticated``. ``drain`` names the :class:`~.drain.DrainState` actor
    of ``imagegen serve``, if any.
    """
    sv, rt = spec.serve, spec.runtime
    digests = load_key_digests(sv)
    check_exposure(host, sv, digests)
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
        # A replica Serve stops (scale-down, redeploy, node drain) finishes its requests first.
        graceful_shutdown_timeout_s=sv.shutdown_grace_s,
        graceful_shutdown_wait_loop_s=min(1.0, sv.shutdown_grace_s),
        ray_actor_options={"num_cpus": rt.cpus_per_actor, "num_gpus": gpus},
    )
    # The batch job's own engine actor class: same thread count, so CPU pixels match exactly.
    return deployment.bind(spec, catalog, digests, drain)


class AppArgs(BaseModel):
    """Arguments of :func:`app_builder` in a Serve config file (``args:``)."""

    model_config = ConfigDict(extra="forbid")

    spec: str
    overrides: list[str] = Field(default_factory=list)


def app_builder(args: dict[str, Any]) -> Application:
    """Application builder for ``serve deploy`` / ``serve run`` / a RayService: ``args`` is
    ``{"spec": path, "overrides": ["key.path=value", ...]}`` (see ``jobs/serve-deploy.yaml``).

    The config file's ``http_options`` and ``route_prefix`` apply there; the spec's
    ``serve.host``, ``serve.port`` and ``serve.route_prefix`` only apply to ``imagegen serve``.
    The keys (``serve.api_keys_file`` / ``api_keys_env``) are read where Serve runs this
    builder, which may be any node of the cluster: mount them on every node.
    """
    parsed = AppArgs.model_validate(args)
    return build_app(load_spec(parsed.spec, parsed.overrides), _serve_http_host())


def _serve_http_host() -> Optional[str]:
    """The host Serve's proxies listen on, from the running controller; None if unknown."""
    try:
        from ray.serve.context import _get_global_client

        return ray.get(_get_global_client()._controller.get_http_config.remote(), timeout=10).host
    except Exception:  # noqa: BLE001 - unknown means "maybe reachable": keys are then required
        return None


def start(spec: JobSpec, name: str = APP_NAME, drain: Optional[str] = None) -> str:
    """Deploy ``spec``'s app on the connected Ray, listening on ``serve.host:serve.port``
    under ``serve.route_prefix``; return its base URL once the app is running.

    HTTP options take effect only when Serve is not running yet on the cluster: a second
    app shares the first one's proxy.
    """
    sv = spec.serve
    app = build_app(spec, sv.host, drain)
    serve.start(http_options={"host": sv.host, "port": sv.port})
    serve.run(app, name=name, route_prefix=sv.route_prefix)
    host = f"[{sv.host}]" if ":" in sv.host else sv.host
    return f"http://{host}:{sv.port}{sv.route_prefix.rstrip('/')}"
