"""The spec's ``serve`` section: the online front (``imagegen serve``), where it listens,
how it batches, how it sheds load, its keys and per-key caps, and its shutdown grace."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.spec.section import Section


class ServeConfig(Section):
    """The online front (``imagegen serve``): where it listens, how it batches, how it sheds load.

    ``host`` is loopback unless set: listening on any other address must be a choice
    (``0.0.0.0`` in a container). ``max_batch_size`` counts images, not HTTP requests (a
    request with ``n: 4`` is four batch items); ``batch_wait_timeout_s`` is how long a
    replica waits to fill a batch. ``max_ongoing_requests`` bounds the HTTP requests one
    replica holds at once; beyond that, requests wait at the proxy, and once more than
    ``max_queued_requests`` wait, the proxy answers 503 with ``Retry-After:
    retry_after_s`` instead of queueing without bound. Replicas scale between
    ``min_replicas`` and ``max_replicas`` towards ``target_ongoing_requests`` each.
    Replica resources are the engine actors' (``runtime.cpus_per_actor``,
    ``runtime.gpus_per_actor``).

    ``quality_steps`` maps OpenAI's ``quality`` values to step counts (a request's
    ``quality`` not named here, or ``auto``, takes ``defaults.steps``).

    API keys: ``api_keys_file`` (a file of keys, one a line, ``#`` comments) or
    ``api_keys_env`` (the NAME of an environment variable holding them, comma or
    whitespace separated); never a key itself, which would end up in manifests and
    configs. With keys, every route but ``/healthz`` needs ``Authorization: Bearer KEY``.
    ``max_ongoing_requests_per_key`` caps the requests one key may hold in a replica at once
    (of its ``max_ongoing_requests``), so no key can take the whole front; past it, 429 with
    ``Retry-After``. It needs keys (without them there is no key to count by).
    Listening on a non-loopback ``host`` without keys is refused unless
    ``allow_unauthenticated: true``. ``shutdown_grace_s``: on SIGTERM/SIGINT new requests
    get 503 and those in flight get this long to finish (also each replica's graceful
    shutdown when Serve stops it). ``max_body_bytes``: a request body past it is 413
    before it is read whole (an images body is a prompt and a few fields: OpenAI's longest
    prompt, 32000 characters, is at most 128 KB of UTF-8).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    retry_after_s: float = Field(1.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    quality_steps: dict[Literal["low", "medium", "high", "xhigh", "max", "standard", "hd"], int] = Field(default_factory=dict)
    api_keys_file: Optional[str] = None
    api_keys_env: Optional[str] = None
    allow_unauthenticated: bool = False
    max_ongoing_requests_per_key: Optional[int] = Field(None, ge=1)
    shutdown_grace_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.api_keys_file is not None and self.api_keys_env is not None:
            raise ValueError("set one of api_keys_file and api_keys_env, not both")
        # Checked here, not by a field pattern: a field error would quote the value, and a
        # value that is not a variable name may well be a key pasted in by mistake.
        if self.api_keys_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_keys_env):
            raise ValueError("api_keys_env must be the NAME of an environment variable (letters, digits, _) that holds the keys, never a key")
        if self.max_ongoing_requests_per_key is not None and self.api_keys_file is None and self.api_keys_env is None:
            raise ValueError("max_ongoing_requests_per_key counts requests by API key: set api_keys_file or api_keys_env too, or remove it")
        bad = {name: steps for name, steps in self.quality_steps.items() if steps < 1}
        if bad:
            raise ValueError(f"quality_steps must be whole numbers of steps >= 1, got {bad}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        return self
