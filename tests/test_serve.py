"""The online front: a real Serve app on 127.0.0.1 with the tiny model, driven over HTTP.

One local Ray (2 CPUs) and one app for the module (with the drain coordinator that
``imagegen serve`` gives it); tests that need other settings deploy a second, small app
beside it. A test that shuts Serve down leaves the next one a restarted app, so the tests
can run in any order. Waits are polls with a deadline, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pyarrow.parquet as pq
import pytest
import ray
import requests
from PIL import Image
from ray import serve

from pipeline.errors import SpecError
from pipeline.batch.run import run as run_batch
from pipeline.serve.app import APP_NAME, _serve_http_host, api, build_app, start
from pipeline.serve.auth import KeyCheck, check_exposure, digest, load_key_digests
from pipeline.serve.drain import NAMESPACE, DrainState, actor_name
from pipeline.serve.gate import OPEN_PATHS
from pipeline.serve.http_api import MAX_BODY_DEPTH, default_id
from pipeline.serve.in_flight import InFlight, KeyBusy
from pipeline.spec.load import parse_spec

from polling import free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

SERVE_PROCESS_MARKERS = ("ServeController", "ProxyActor", "ServeReplica")






def _serving(condition, what: str, timeout: float = 60.0):
    """Poll a server until ``condition`` holds; connection errors while it starts count as not yet."""
    return wait_for(condition, timeout, what, ignore=(requests.RequestException, OSError))

def _spec_data(root: Path, port: int, **serve: Any) -> dict[str, Any]:
    return {
        # Only the batch-equivalence test reads the input; the front ignores it.
        "input": {"url": str(root / "prompts.jsonl"), "id_column": "id"},
        "model": {"ref": "tiny", "cache_dir": str(root / "models"), "device": "cpu"},
        "defaults": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5, "seed": 1234},
        "limits": {"max_width": 128, "max_height": 128, "max_num_images": 8, "max_prompt_chars": 200},
        "output": {"url": str(root / "out"), "mode": "overwrite", "format": "png"},
        # batch_size 1: the batch job then makes each image alone, as a lone HTTP request is,
        # so CPU pixels (which may move by 1/255 with batch composition) match exactly.
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.25, "batch_size": 1},
        "serve": {
            "host": "127.0.0.1",
            "port": port,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "max_ongoing_requests": 32,
            "max_queued_requests": 64,
            "min_replicas": 1,
            "max_replicas": 1,
            "target_ongoing_requests": 16,
            "quality_steps": {"low": 1, "standard": 3, "hd": 4},
            **serve,
        },
    }


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="igserve-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for this module; reused (and left running) if something else started one."""
    owned = not ray.is_initialized()
    temp_dir = tempfile.mkdtemp(prefix="igs", dir="/tmp")  # short: Ray's socket paths have a length limit
    if owned:
        ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False, logging_level="WARNING")
    yield owned
    serve.shutdown()
    if owned:
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def main_spec(ray_session, workdir):
    spec = parse_spec(_spec_data(workdir, free_port()), source="test spec")
    # As `imagegen serve` runs it: /healthz then reports the app-wide in-flight count. The
    # handle is held for the module: the actor lives as long as it.
    drain = DrainState.options(name=actor_name(APP_NAME), namespace=NAMESPACE).remote()
    yield spec
    del drain


@pytest.fixture
def app(main_spec):
    """The main app, (re)started if Serve is not running it: returns (base URL, spec)."""
    sv = main_spec.serve
    url = f"http://{sv.host}:{sv.port}"
    try:
        up = requests.get(f"{url}/healthz", timeout=10).status_code == 200
    except requests.ConnectionError:
        up = False
    if not up:
        start(main_spec, drain=actor_name(APP_NAME))
        _serving(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200, "the app to answer /healthz")
    return url, main_spec


def _generate(url: str, body: dict[str, Any], timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def _png(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_single_request(app):
    url, spec = app
    response = _generate(url, {"prompt": "a red fox in the snow", "size": "64x64", "seed": 7, "n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int)
    assert [item["seed"] for item in body["data"]] == [7, 8]
    assert [item["image_index"] for item in body["data"]] == [0, 1]
    for item in body["data"]:
        assert _png(item).size == (64, 64)
        assert len(item["request_id"]) == 32
        assert item["batch_size"] >= 1 and 1 <= item["bucket_size"] <= item["batch_size"]
        assert item["steps"] == spec.defaults.steps and item["format"] == "png"
    assert body["data"][0]["request_id"] != body["data"][1]["request_id"]

    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "tiny"
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


def test_concurrent_requests_are_batched(app):
    url, _ = app
    bodies = [{"prompt": f"prompt number {i}", "seed": i} for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda b: _generate(url, b), bodies))
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    items = [r.json()["data"][0] for r in responses]
    assert [item["seed"] for item in items] == list(range(32))
    assert len({item["request_id"] for item in items}) == 32
    assert max(item["batch_size"] for item in items) > 1


def test_mixed_sizes_in_one_burst(app):
    url, _ = app
    sizes = ["64x64", "32x32", "64x32", "32x64", "48x48"] * 3
    bodies = [{"prompt": f"a lighthouse {i}", "size": size, "seed": i} for i, size in enumerate(sizes)]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda b: _generate(url, b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
    for size, response in zip(sizes, responses):
        item = response.json()["data"][0]
        width, height = (int(v) for v in size.split("x"))
        assert _png(item).size == (width, height)
        assert (item["width"], item["height"]) == (width, height)
        assert item["bucket_size"] <= item["batch_size"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"size": "64x64"}, "prompt"),
        ({"prompt": "x", "size": "abc"}, "size"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x" * 201}, "prompt"),
        ({"prompt": "x", "size": "4096x64"}, "size"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "quality": "standard", "steps": 3}, "quality"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "stepz": 3}, "stepz"),
        ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ],
)
def test_bad_request_is_a_4xx_naming_the_field(app, body, param):
    url, _ = app
    response = _generate(url, body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"]


def test_body_that_is_not_json_is_a_400(app):
    url, _ = app
    response = requests.post(f"{url}/v1/images/generations", data=b"{not json", headers=JSON, timeout=30)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


JSON = {"Content-Type": "application/json"}


def _openai_error(response: requests.Response) -> dict[str, Any]:
    """The error of an OpenAI-shaped error body (fails on any other body)."""
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and {"type", "param", "code"} <= set(error), response.text
    return error


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1"],
)
def test_only_json_bodies_are_read_and_no_cors_headers(app, content_type):
    # What a web page can send cross-site without a preflight (text/plain, forms): refused
    # before any work, however valid the JSON inside.
    url, _ = app
    body = json.dumps({"prompt": "made by a web page", "size": "32x32"}).encode()
    headers = {"Origin": "http://evil.example"} | ({"Content-Type": content_type} if content_type else {})
    response = requests.post(f"{url}/v1/images/generations", data=body, headers=headers, timeout=30)
    assert response.status_code == 415, response.text
    assert _openai_error(response)["code"] == "unsupported_media_type"
    # No CORS: a preflight is not granted, so a browser never sends the JSON request either.
    preflight = requests.options(
        f"{url}/v1/images/generations",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
        timeout=30,
    )
    for answer in (response, preflight):
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")], answer.headers


def test_a_body_past_max_body_bytes_is_a_413_with_or_without_its_length(app):
    url, spec = app
    limit = spec.serve.max_body_bytes
    body = json.dumps({"prompt": "a red fox", "size": "32x32", "steps": 1}).encode()
    at_limit = body + b" " * (limit - len(body))  # JSON allows the trailing spaces
    assert requests.post(f"{url}/v1/images/generations", data=at_limit, headers=JSON, timeout=120).status_code == 200
    past = at_limit + b" "

    def chunked():  # no Content-Length: the replica counts as it reads
        for at in range(0, len(past), 64 << 10):
            yield past[at : at + (64 << 10)]

    for data in (past, chunked()):
        response = requests.post(f"{url}/v1/images/generations", data=data, headers=JSON, timeout=120)
        assert response.status_code == 413, response.text
        assert _openai_error(response)["code"] == "request_too_large" and "serve.max_body_bytes" in response.text


def test_json_with_a_charset_is_read(app):
    url, _ = app
    body = json.dumps({"prompt": "a red fox", "size": "32x32", "steps": 1}).encode()
    response = requests.post(f"{url}/v1/images/generations", data=body, headers={"Content-Type": "application/json; charset=utf-8"}, timeout=120)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "raw, param, text",
    [
        (b'{"prompt": "x\\ud800"}', "prompt", "lone surrogate (U+D800)"),
        (b'{"prompt": "ok", "negative_prompt": ["\\udfff"]}', "negative_prompt", "lone surrogate (U+DFFF)"),
        (b'{"prompt": "x", "seed": NaN}', None, "NaN"),
        (b'{"prompt": "x", "guidance_scale": 1e400}', None, "beyond the range"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None, "5000 digits"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "prompt", "nested too deeply"),
        (b'{"prompt": "caf\xe9"}', None, "not UTF-8"),
    ],
)
def test_bodies_no_encoder_can_take_are_a_400_naming_the_field(app, raw, param, text):
    url, _ = app
    response = requests.post(f"{url}/v1/images/generations", data=raw, headers=JSON, timeout=30)
    assert response.status_code == 400, response.text
    error = _openai_error(response)
    assert error["param"] == param and text in error["message"], error


def _fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value from the corners: edge text, extreme numbers, odd types, nesting."""
    texts = ["", " ", "x\ud800", "\udc00x", "\ud83d\ude00", "\x00", "a\u202eb", "e\u0301", "\uffff", "\U0010ffff", "x" * 10_000, "64x64", "0x0", "auto", "-1x-1", "１２８x１２８", "null"]
    numbers = [0, -1, 1, 2, 3, -0.0, 0.5, 1e-320, 1e308, -1e308, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**40, True, False]
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(texts)
    if roll < 0.7:
        return rng.choice(numbers)
    if roll < 0.75 or depth > 3:
        return None
    if roll < 0.88:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["prompt", "n", "", "\ud800", "a" * 300]): _fuzz_value(rng, depth + 1) for _ in range(rng.randrange(3))}


FUZZ_FIELDS = ["prompt", "n", "size", "seed", "steps", "quality", "model", "id", "negative_prompt", "guidance_scale", "output_format",
               "output_compression", "response_format", "style", "user", "lora", "lora_scale", "max_sequence_length", "stream", "frame_count"]


def _fuzz_body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.1:  # anything at all as the whole body
        return json.dumps(_fuzz_value(rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", errors="surrogatepass")
    if kind < 0.15:  # deep nesting, sometimes past any parser's recursion
        depth = rng.choice([MAX_BODY_DEPTH, MAX_BODY_DEPTH + 1, 999, 50_000])
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind < 0.2:  # broken bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    # A cheap valid request with one to three fields replaced by corner values: mostly
    # 400s, and the valid ones stay tiny (at most 3 steps and 3 images of 32x32).
    body: dict[str, Any] = {"prompt": "fuzz", "size": "32x32", "steps": 1}
    for name in rng.sample(FUZZ_FIELDS, rng.randrange(1, 4)):
        body[name] = _fuzz_value(rng)
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", errors="surrogatepass")


def test_fuzzed_bodies_are_never_a_5xx(app):
    """Every bad body is a 4xx in OpenAI's shape; nothing the client sends is a 5xx."""
    url, _ = app
    rng = random.Random(23)
    bodies = [_fuzz_body(rng) for _ in range(160)]

    def post(raw: bytes) -> requests.Response:
        return requests.post(f"{url}/v1/images/generations", data=raw, headers=JSON, timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(post, bodies))
    wrong = [(raw[:120], r.status_code, r.text[:300]) for raw, r in zip(bodies, answers) if r.status_code >= 500 or r.status_code not in (200, 400)]
    assert not wrong, wrong
    for answer in answers:
        if answer.status_code == 400:
            _openai_error(answer)
    assert 0 < sum(a.status_code == 200 for a in answers) < len(answers)  # both kinds were tried


def test_same_request_ids_and_bytes_as_the_batch_job(app, workdir):
    url, spec = app
    rows = [
        {"id": "row-a", "prompt": "a red fox", "seed": 7},
        {"id": "row-b", "prompt": "a blue bird", "negative_prompt": "blurry", "steps": 3},
        # What a request without `id` is: the batch row with the documented default id.
        {"id": default_id("a green tree"), "prompt": "a green tree", "width": 32, "height": 48},
    ]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = run_batch(spec)
    assert summary.images == 3 and summary.errors == 0
    table = pq.read_table(workdir / "out" / "images", columns=["id", "request_id", "seed", "image"]).to_pylist()
    written = {row["id"]: row for row in table}

    bodies = [
        {"id": "row-a", "prompt": "a red fox", "seed": 7},
        {"id": "row-b", "prompt": "a blue bird", "negative_prompt": "blurry", "steps": 3},
        {"prompt": "a green tree", "size": "32x48"},
    ]
    for row, body in zip(rows, bodies):
        response = _generate(url, body)  # one at a time: each image alone, as in the batch job
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        expected = written[row["id"]]
        assert item["id"] == row["id"]
        assert item["request_id"] == expected["request_id"]
        assert item["seed"] == expected["seed"]
        assert base64.b64decode(item["b64_json"]) == expected["image"]["bytes"]


def test_overload_is_a_503_with_retry_after(app, workdir):
    url, main_spec = app
    data = _spec_data(
        workdir,
        main_spec.serve.port,  # a second app shares the running proxy
        route_prefix="/overload",
        max_ongoing_requests=1,
        max_queued_requests=1,
        max_batch_size=1,
        retry_after_s=2,
    )
    data["defaults"]["steps"] = 10  # each request holds the only slot a while
    spec = parse_spec(data, source="overload spec")
    start(spec, name="overload")
    base = url.rstrip("/") + "/overload"
    try:
        _serving(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, "the overload app")
        bodies = [{"prompt": f"crowd {i}", "seed": i} for i in range(12)]
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            responses = list(pool.map(lambda b: _generate(base, b), bodies))
        codes = [r.status_code for r in responses]
        assert 200 in codes, codes
        rejected = [r for r in responses if r.status_code == 503]
        assert rejected, codes
        assert all(r.headers.get("Retry-After") == "2" for r in rejected)
        assert set(codes) <= {200, 503}, codes
    finally:
        serve.delete("overload")


def _health(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/healthz", timeout=30).json()


def test_abandoned_requests_drop_their_queued_images_and_count_until_the_engine_is_done(app):
    """Clients that give up (an SDK timing out and retrying does this) take their waiting
    images with them; what is on the engine still counts as in flight until it returns."""
    url, spec = app
    before = _health(url)["replica"]
    heavy = [{"prompt": f"abandoned {i}", "n": 8, "steps": 12, "seed": i} for i in range(3)]
    connections = []
    for body in heavy:
        connection = http.client.HTTPConnection(spec.serve.host, spec.serve.port, timeout=60)
        connection.request("POST", "/v1/images/generations", body=json.dumps(body), headers=JSON)
        connections.append(connection)
    _serving(lambda: _health(url)["replica"]["in_flight"] == 3 and _health(url)["replica"]["images_running"] > 0, "the first request on the engine")
    for connection in connections:
        connection.close()  # the clients go away; the server only sees the connections close

    samples = []

    def settled() -> bool:
        samples.append(_health(url))
        return samples[-1]["replica"]["in_flight"] == 0

    def gone() -> bool:  # every request the replica still holds is one whose client left
        samples.append(_health(url))
        return samples[-1]["replica"]["in_flight"] == samples[-1]["replica"]["abandoned"]

    _serving(gone, "the server to see the clients gone")
    small = _generate(url, {"prompt": "a small request", "size": "32x32", "steps": 1})
    _serving(settled, "the abandoned work to end")
    after = _health(url)["replica"]

    assert small.status_code == 200, small.text
    assert small.json()["data"][0]["batch_size"] == 1  # made alone, not with anything abandoned
    made = after["images_discarded"] - before["images_discarded"]
    dropped = after["images_dropped"] - before["images_dropped"]
    # Only the call on the engine when the clients left was made (one batch); the other
    # 16 images never started, and so were not ahead of the small request.
    assert made + dropped == 24 and 0 < made <= spec.serve.max_batch_size, (made, dropped)
    working = [h for h in samples if h["replica"]["images_running"]]
    assert any(h["replica"]["abandoned"] for h in working), "the abandoned work was seen on the engine"
    # While the engine works for clients that left, the server never says it is idle.
    assert all(h["replica"]["in_flight"] >= 1 and h["in_flight"] >= 1 for h in working), working


def test_in_flight_counts_abandoned_work_for_admission_and_limits_each_key():
    """The replica's ledger alone (no Serve): a slot held by abandoned work is not free;
    a key at its share is refused at once, even while its requests wait for a slot."""

    async def scenario() -> list[str]:
        events: list[str] = []
        ledger = InFlight(slots=1, per_key=2)
        first = await ledger.admit("a", on_release=lambda: events.append("first released"))
        ledger.queue(first, 3)
        assert ledger.start(first)  # one image on the engine
        ledger.abandon(first)  # the client leaves: 2 images dropped, 1 still running
        ledger.leave(first)
        assert not ledger.start(first)  # a batch that reaches a dropped image skips it
        waiting = asyncio.ensure_future(ledger.admit("a", on_release=lambda: events.append("second released")))
        await asyncio.sleep(0)
        assert not waiting.done(), "the slot is still held by the abandoned request's running image"
        with pytest.raises(KeyBusy):
            await ledger.admit("a")  # key a holds one and waits for another: its share
        other = asyncio.ensure_future(ledger.admit("b"))
        ledger.finish(first)  # the engine returns: discarded, and the slot is free
        second = await waiting
        events.append(f"dropped {ledger.dropped}, discarded {ledger.discarded}, in flight {ledger.counts().in_flight}")
        other.cancel()  # a client that leaves while waiting holds nothing
        await asyncio.gather(other, return_exceptions=True)
        ledger.leave(second)
        assert ledger.counts().in_flight == 0 and not ledger._by_key
        return events

    assert asyncio.run(scenario()) == ["first released", "dropped 2, discarded 1, in flight 1", "second released"]


def test_requests_pick_a_model_and_an_adapter(app, workdir):
    from pipeline.engine.tiny_models import build_tiny_lora

    url, main_spec = app
    data = _spec_data(workdir, main_spec.serve.port, route_prefix="/variations")
    cache = data.pop("model")["cache_dir"]
    data["models"] = {"sd": {"ref": "tiny", "cache_dir": cache, "device": "cpu"}, "flux": {"ref": "tiny-flux", "cache_dir": cache, "device": "cpu"}}
    data["defaults"]["model"] = "sd"
    data["loras"] = {"style": {"url": build_tiny_lora("tiny", str(workdir), seed=3)}}
    start(parse_spec(data, source="variations spec"), name="variations")
    base = url.rstrip("/") + "/variations"
    try:
        _serving(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, "the variations app")
        listed = {m["id"]: m for m in requests.get(f"{base}/v1/models", timeout=10).json()["data"]}
        assert {name: (m["family"], m["default"]) for name, m in listed.items()} == {"sd": ("sd", True), "flux": ("flux", False)}
        flux = _generate(base, {"prompt": "a red fox", "model": "flux", "seed": 1})
        assert flux.status_code == 200, flux.text
        (item,) = flux.json()["data"]
        assert (item["model"], item["model_family"], item["pipeline_class"]) == ("flux", "flux", "FluxPipeline")
        plain, styled = (_generate(base, {"prompt": "a red fox", "seed": 1, **extra}).json()["data"][0] for extra in ({}, {"lora": "style"}))
        assert (styled["lora"], styled["lora_scale"], plain["lora"]) == ("style", 1.0, None)
        assert styled["request_id"] != plain["request_id"] and styled["b64_json"] != plain["b64_json"]
        # A parameter the family does not take, an unknown model: 400s naming the field.
        for body, param, text in (
            ({"prompt": "x", "model": "flux", "negative_prompt": "ugly"}, "negative_prompt", "does not take negative_prompt"),
            ({"prompt": "x", "model": "sdxl"}, "model", "allowed: sd, flux"),
        ):
            response = _generate(base, body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param and text in response.text, response.text
    finally:
        serve.delete("variations")


# -- the OpenAI SDK, as clients use it ----------------------------------------------------


def _client(url: str, key: str = "no-key-needed") -> openai.OpenAI:
    # No retries: the SDK would otherwise retry 5xx answers and hide what the server said.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_sdk_generate_with_every_field(app):
    url, spec = app
    client = _client(url)
    response = client.images.generate(
        model="tiny",
        prompt="a lighthouse at dusk",
        n=2,
        size="auto",
        quality="standard",
        style="vivid",
        response_format="b64_json",
        user="user-123",
        background="opaque",
        moderation="low",
        output_format="jpeg",
        output_compression=90,
        partial_images=0,
        safety_identifier="someone",
        stream=False,
    )
    assert response.output_format == "jpeg" and response.size == "64x64"
    assert len(response.data) == 2
    for image in response.data:
        decoded = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert decoded.format == "JPEG" and decoded.size == (spec.defaults.width, spec.defaults.height)
        extra = image.model_extra
        assert extra["steps"] == spec.serve.quality_steps["standard"] != spec.defaults.steps
        assert extra["format"] == "jpeg"
    # output_compression is honoured for JPEG: lower quality, fewer bytes, same pixels' request.
    small = client.images.generate(prompt="a lighthouse at dusk", output_format="jpeg", output_compression=5, quality="standard")
    big = client.images.generate(prompt="a lighthouse at dusk", output_format="jpeg", output_compression=95, quality="standard")
    assert small.data[0].model_extra["request_id"] == big.data[0].model_extra["request_id"]
    assert len(base64.b64decode(small.data[0].b64_json)) < len(base64.b64decode(big.data[0].b64_json))
    webp = client.images.generate(prompt="a lighthouse at dusk", output_format="webp", size="32x32", quality="low")
    assert Image.open(io.BytesIO(base64.b64decode(webp.data[0].b64_json))).format == "WEBP"
    assert webp.data[0].model_extra["steps"] == 1 and webp.size == "32x32"
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize(
    "kwargs, param, text",
    [
        ({"response_format": "url"}, "response_format", "use 'b64_json'"),
        ({"size": "4096x64"}, "size", "between 1 and 128"),
        ({"model": "dall-e-3"}, "model", "allowed: tiny"),
        ({"extra_body": {"stepz": 3}}, "stepz", "unknown field"),
    ],
)
def test_openai_sdk_shows_our_errors(app, kwargs, param, text):
    url, _ = app
    with pytest.raises(openai.BadRequestError) as caught:
        _client(url).images.generate(prompt="a red fox", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param and text in caught.value.message
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code in ("invalid_value", "unknown_parameter")


def test_unknown_route_answers_in_openai_shape(app):
    url, _ = app
    response = requests.get(f"{url}/v1/images/nowhere", timeout=30)
    assert response.status_code == 404 and "message" in response.json()["error"]


def _route_table(router: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(path, method) of every route the app serves, FastAPI's documentation routes and
    included routers too: read from the app, so a route added later is in it."""
    found = []
    for route in router.routes:
        inner = getattr(route, "original_router", None)  # an included router
        if inner is not None:
            found += _route_table(inner, prefix + route.include_context.prefix)
        else:
            found += [(prefix + route.path, method) for method in sorted(route.methods or ["GET"])]
    return found


def test_api_keys_bearer_401_healthz_open_and_keys_never_logged(app, workdir):
    url, main_spec = app
    keys = workdir / "keys.txt"
    good, wrong = "sk-imagegen-test-GOOD-0123456789", "sk-imagegen-test-WRONG-9876543210"
    keys.write_text(f"# the front's keys\n{good}\n\nsk-another-key\n")
    data = _spec_data(workdir, main_spec.serve.port, route_prefix="/keyed", api_keys_file=str(keys), max_ongoing_requests_per_key=1)
    start(parse_spec(data, source="keyed spec"), name="keyed")
    base = url.rstrip("/") + "/keyed"
    try:
        health = _serving(lambda: requests.get(f"{base}/healthz", timeout=5), "the keyed app", timeout=90)
        assert health.status_code == 200  # probes need no key
        # Route by route, from the app's own table: only /healthz answers without a key.
        routes = _route_table(api)
        assert {"/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/images/generations", "/healthz"} <= {path for path, _ in routes}
        for path, method in routes:
            for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": good}):
                answer = requests.request(method, f"{base}{path}", headers=headers | JSON, data=b"{}", timeout=30)
                if path in OPEN_PATHS:
                    assert answer.status_code == 200, (method, path)
                else:
                    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer", (method, path, answer.status_code)
                    if method != "HEAD":  # a HEAD answer has no body
                        assert _openai_error(answer)["code"] == "invalid_api_key"
        assert requests.get(f"{base}/docs", headers={"Authorization": f"Bearer {good}"}, timeout=30).status_code == 200
        with pytest.raises(openai.AuthenticationError) as caught:
            _client(base, wrong).images.generate(prompt="a red fox")
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        assert wrong not in caught.value.message and good not in caught.value.message
        bare = requests.post(f"{base}/v1/images/generations", json={"prompt": "a red fox"}, timeout=30)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{base}/v1/models", timeout=30).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(base, wrong).models.list()
        answer = _client(base, good).images.generate(prompt="a red fox", size="32x32")
        assert len(answer.data) == 1
        assert [m.id for m in _client(base, "sk-another-key").models.list()] == ["tiny"]

        # max_ongoing_requests_per_key=1: a key with a request in flight gets 429 for the
        # next; another key is served meanwhile.
        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(_client(base, good).images.generate, prompt="a slow fox", n=4, extra_body={"steps": 20})
            _serving(lambda: _health(base)["replica"]["images_running"] > 0, "the slow request on the engine")
            with pytest.raises(openai.RateLimitError) as limited:
                _client(base, good).images.generate(prompt="one more", size="32x32")
            assert limited.value.response.headers["Retry-After"] == f"{main_spec.serve.retry_after_s:g}"
            other = _client(base, "sk-another-key").images.generate(prompt="another key", size="32x32", extra_body={"steps": 1})
            assert len(other.data) == 1  # admitted while the first key was at its limit
            assert len(slow.result().data) == 4
        assert _serve_http_host() == "127.0.0.1"  # what app_builder checks exposure against
    finally:
        serve.delete("keyed")
    # Neither key, nor the wrong one sent, is in any of Ray's logs (Serve's access logs included).
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert good.encode() not in text and wrong.encode() not in text, path


def test_keys_from_an_environment_variable_and_exposure_rules(tmp_path):
    spec = parse_spec(_spec_data(tmp_path, 8000, api_keys_env="IMAGEGEN_TEST_KEYS"), source="env keys")
    digests = load_key_digests(spec.serve, {"IMAGEGEN_TEST_KEYS": "sk-one, sk-two\nsk-three"})
    check = KeyCheck(digests)
    assert [check.allows(h) for h in ("Bearer sk-two", "bearer sk-three", "Bearer sk-four", "sk-one", None, "Basic sk-one")] == [
        True, True, False, False, False, False
    ]
    assert digest("sk-one") in digests and "sk-one" not in repr(digests)
    with pytest.raises(SpecError, match="IMAGEGEN_TEST_KEYS, which is not set") as unset:
        load_key_digests(spec.serve, {})
    assert "sk-" not in str(unset.value)
    with pytest.raises(SpecError, match="api_keys_env") as pasted:
        parse_spec(_spec_data(tmp_path, 8000, api_keys_env="sk-live-abc"), source="a key written in the spec")
    assert "sk-live-abc" not in str(pasted.value)
    # A per-key cap counts by key: without keys it is a spec error naming the fields.
    with pytest.raises(SpecError, match="max_ongoing_requests_per_key counts requests by API key: set api_keys_file or api_keys_env"):
        parse_spec(_spec_data(tmp_path, 8000, max_ongoing_requests_per_key=2), source="a cap without keys")
    # Non-loopback without keys: refused unless allow_unauthenticated says so.
    open_spec = parse_spec(_spec_data(tmp_path, 8000, host="0.0.0.0"), source="open")
    with pytest.raises(SpecError, match="allow_unauthenticated"):
        check_exposure("0.0.0.0", open_spec.serve, ())
    check_exposure("127.0.0.1", open_spec.serve, ())
    check_exposure("::1", open_spec.serve, ())
    check_exposure("0.0.0.0", open_spec.serve, digests)
    allowed = parse_spec(_spec_data(tmp_path, 8000, host="0.0.0.0", allow_unauthenticated=True), source="open on purpose")
    check_exposure("0.0.0.0", allowed.serve, ())
    # `serve deploy` / a RayService: where Serve listens is unknown to the builder until it
    # asks the controller; unknown counts as reachable, so keys are needed.
    with pytest.raises(SpecError, match="without API keys"):
        build_app(parse_spec(_spec_data(tmp_path, 8000), source="no keys"), None)


def _descendants(root: int) -> list[int]:
    """Process ids below ``root``, from /proc (no psutil in this environment)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; fields resume after the last ')'.
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, ppid in parent.items() if ppid == pid]
        found += children
        frontier += children
    return found


def _serve_processes() -> list[str]:
    titles = []
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in title for marker in SERVE_PROCESS_MARKERS):
            titles.append(title)
    return titles


def _port_closed(url: str) -> bool:
    try:
        requests.get(f"{url}/healthz", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_clean_shutdown(app, ray_session):
    url, _ = app
    serve.shutdown()
    _serving(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"], "Serve actors to exit")
    _serving(lambda: _port_closed(url), "the HTTP port to close")
    if ray_session and os.path.isdir("/proc"):  # the Ray processes are this test process's children only when it started Ray
        _serving(lambda: not _serve_processes(), "Serve processes to exit", timeout=30)
