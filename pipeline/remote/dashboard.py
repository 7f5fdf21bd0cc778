"""Talking to a Ray cluster's dashboard (the Job Submission API): which address, whether
anything answers there within seconds, and what each failure means, as
:class:`~pipeline.errors.ClusterError` messages that say what to do."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shlex
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

from pipeline.errors import ClusterError
from pipeline.spec.config import JobSpec

# How long the dashboard may take to answer the first request before the address is
# called unreachable: the Job Submission client itself would wait on a silent address for
# as long as the operating system lets a TCP connect hang (minutes).
PROBE_TIMEOUT_S = 5.0

# Ray's client narrates the working_dir upload file by file, warns that .git and .venv are
# now left out of it (which is what this module wants), and logs the log stream's close.
_CHATTY_LOGGERS = (
    "ray._private.runtime_env.packaging",
    "ray._private.runtime_env.working_dir",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
)

_AUTH_ADVICE = (
    "the cluster uses token authentication: run with RAY_AUTH_MODE=token and the cluster's token in "
    "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` prints it on the head node)"
)


# How long a job may take to show a final status after its log stream has closed.
SETTLE_S = 30.0


@dataclass(frozen=True)
class JobRequest:
    """What is sent to the cluster: a shell entrypoint and the Ray runtime environment."""

    entrypoint: str
    runtime_env: dict[str, Any]

    @property
    def arguments(self) -> list[str]:
        """The entrypoint as an argument list (``python``, the script, then its arguments)."""
        return shlex.split(self.entrypoint)


def dashboard_address(given: Optional[str], spec: Optional[JobSpec] = None) -> str:
    """The Ray dashboard URL to talk to: ``given`` (``--address``), else the spec's
    ``runtime.address`` when it is an ``http(s)://`` URL.

    Raises :class:`ClusterError` when neither names a dashboard, or ``given`` is not an
    ``http(s)://host[:port]`` URL.
    """
    if given:
        return _checked_url(given, "--address")
    address = spec.runtime.address if spec else None
    if address and urlsplit(address).scheme in ("http", "https"):
        return _checked_url(address, "runtime.address")
    named = f"; the spec's runtime.address is {address!r}, not a dashboard URL" if address else ""
    raise ClusterError(
        "imagegen submit needs the Ray dashboard of the cluster: pass --address http://HEAD:8265 (the head node's "
        f"dashboard, port 8265 unless `ray start --dashboard-port` says otherwise){named}"
    )


def _checked_url(address: str, source: str) -> str:
    parts = urlsplit(address)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(
            f"{source} {address!r} is not a Ray dashboard URL; give one like http://HEAD:8265 "
            "(the dashboard's HTTP address, not the GCS host:port or a ray:// client address)"
        )
    return address.rstrip("/")


@contextmanager
def _dashboard_errors(address: str, action: str) -> Iterator[None]:
    """Turn what the Job Submission client raises into a ClusterError saying what to do."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ClusterError:
        raise
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "authentication failed"
        raise ClusterError(f"the Ray dashboard at {address} refused to {action}: {first}; {_AUTH_ADVICE}") from None
    except (requests.RequestException, aiohttp.ClientError, asyncio.TimeoutError) as exc:
        # requests' and aiohttp's connection errors: the cluster went away mid-way.
        raise ClusterError(
            f"lost the connection to the Ray dashboard at {address} while trying to {action}: {exc}. "
            "Check that the cluster is still up (`ray status` on the head node)."
        ) from None
    except RuntimeError as exc:
        # The client raises a bare RuntimeError carrying the dashboard's HTTP answer.
        raise ClusterError(f"the Ray dashboard at {address} could not {action}: {exc}") from None


class Dashboard:
    """A checked connection to one cluster's Job Submission API; every method raises
    :class:`ClusterError` with the next step to take instead of a client traceback."""

    def __init__(self, address: str):
        """Connect to ``address`` (an ``http(s)://`` dashboard URL), failing within
        :data:`PROBE_TIMEOUT_S` seconds when nothing, or something other than a Ray
        dashboard, answers there."""
        self.address = _checked_url(address, "the address")
        _probe(self.address)
        from ray.job_submission import JobSubmissionClient

        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with _dashboard_errors(self.address, "connect"):
            self._client = JobSubmissionClient(self.address)

    def submit(self, request: JobRequest) -> str:
        """Submit ``request`` (uploading its working directory) and return the job id."""
        with _dashboard_errors(self.address, "take the job"):
            return self._client.submit_job(entrypoint=request.entrypoint, runtime_env=request.runtime_env)

    def info(self, job_id: str) -> Any:
        """The job's :class:`ray.job_submission.JobDetails` (status, message, times...)."""
        with _dashboard_errors(self.address, f"report on job {job_id}"):
            try:
                return self._client.get_job_info(job_id)
            except RuntimeError as exc:
                if "404" in str(exc):
                    raise ClusterError(
                        f"there is no job {job_id!r} on the cluster at {self.address}; "
                        f"`ray job list --address {self.address}` lists its jobs"
                    ) from None
                raise

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        self.info(job_id)  # a clear message for an unknown id
        with _dashboard_errors(self.address, f"send the logs of job {job_id}"):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str, on_chunk: Callable[[str], None]) -> None:
        """Pass the job's log to ``on_chunk``, from its start, chunk by chunk as the driver
        prints it; return once the job has ended. Ctrl-C raises KeyboardInterrupt here and
        leaves the job running."""
        self.info(job_id)

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                on_chunk(chunk)

        # One event loop for the whole stream: asyncio.run closes the client's websocket
        # session cleanly however the stream ends, Ctrl-C included.
        with _dashboard_errors(self.address, f"stream the logs of job {job_id}"):
            asyncio.run(tail())

    def final_info(self, job_id: str) -> Any:
        """The job's info once its status is final; its log stream closes at that moment,
        and this allows the status a few seconds to catch up."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            info = self.info(job_id)
            if info.status.is_terminal():
                return info
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the log stream of job {job_id} ended but the job is still {info.status.value}; "
                    f"follow it with `imagegen logs {job_id} --address {self.address} --follow`"
                )
            time.sleep(0.5)


def _probe(address: str) -> None:
    """Fail within PROBE_TIMEOUT_S unless a Ray dashboard answers at ``address``."""
    url = f"{address}/api/version"
    hint = (
        "Check the address: it is the head node's dashboard (port 8265 unless `ray start --dashboard-port` says "
        "otherwise), reachable from here only if the head was started with --dashboard-host=0.0.0.0 (or through "
        "`ray dashboard infra/ray-launcher.yaml` / `kubectl port-forward`); and check the cluster is up (`ray status`)."
    )
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as answer:
            body = answer.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a dashboard that wants a token: the client sends it, or says it has none
        raise ClusterError(f"{address} answered HTTP {exc.code} to {url}: it is not a Ray dashboard. {hint}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f"no answer within {PROBE_TIMEOUT_S:g} s"
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {reason}. {hint}") from None
    except http.client.HTTPException as exc:
        # Something listens there but does not speak HTTP/1 (the GCS port, for one).
        raise ClusterError(f"{address} does not answer HTTP as a Ray dashboard does ({type(exc).__name__}). {hint}") from None
    try:
        json.loads(body)["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"{address} answered {url}, but not as a Ray dashboard does. {hint}") from None
