"""Ray wiring for running a job spec on a remote Ray cluster through the Job Submission API.

``imagegen submit SPEC`` sends ``python jobs/generate.py SPEC [--set ...]`` to the
cluster's dashboard (``http://HEAD:8265``): the same ``imagegen run`` code then runs as
the job's driver on the head node, joined to that cluster.

What travels with the job: the repository this package runs from (the folder holding
``pipeline/`` and ``jobs/generate.py``) is uploaded as the job's ``working_dir``, minus
what ``.gitignore`` names (``.venv``, ``output``...) and Ray's default excludes. So the
cluster runs exactly the code that submitted it, and the spec travels inside that upload:
it must be a file under the repository, named in the entrypoint by its path relative to
it. On the cluster, relative paths in the spec resolve against the job's copy of the
repository, as they resolve against the repository root for ``imagegen run``; the prompt
table and the output must be somewhere every node reaches (``s3://``, or a shared folder).

Nothing here knows about images: it builds the entrypoint, talks to the dashboard, and
turns what can go wrong there into :class:`~pipeline.errors.ClusterError` messages.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

from pipeline.config import JobSpec
from pipeline.errors import ClusterError, SpecError

# The job's entrypoint script, relative to the repository root (the job's working_dir).
ENTRYPOINT_SCRIPT = "jobs/generate.py"

# How long the dashboard may take to answer the first request before the address is
# called unreachable: the Job Submission client itself would wait on a silent address for
# as long as the operating system lets a TCP connect hang (minutes).
PROBE_TIMEOUT_S = 5.0

# How long a job may take to show a final status after its log stream has closed.
_SETTLE_S = 30.0

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


def repository_root() -> Path:
    """The folder uploaded as the job's working directory: the parent of the ``pipeline``
    package, which must also hold :data:`ENTRYPOINT_SCRIPT`.

    Raises :class:`ClusterError` when the package is installed without its repository
    (a wheel in site-packages), since there is then no entrypoint to upload.
    """
    import pipeline

    root = Path(pipeline.__file__).resolve().parent.parent
    if not (root / ENTRYPOINT_SCRIPT).is_file():
        raise ClusterError(
            f"imagegen submit uploads the repository it runs from, but {root} has no {ENTRYPOINT_SCRIPT}: "
            "run it from a checkout of the imagegen repository (installed with `pip install -e .`)"
        )
    return root


@dataclass(frozen=True)
class JobRequest:
    """What is sent to the cluster: a shell entrypoint and the Ray runtime environment."""

    entrypoint: str
    runtime_env: dict[str, Any]

    @property
    def arguments(self) -> list[str]:
        """The entrypoint as an argument list (``python``, the script, then its arguments)."""
        return shlex.split(self.entrypoint)


def job_request(spec_path: str | Path, overrides: Sequence[str], root: Optional[Path] = None) -> JobRequest:
    """The job that runs ``spec_path`` with ``overrides`` on a cluster: ``python
    jobs/generate.py SPEC --set ...`` in a working directory that is the repository
    ``root`` (by default :func:`repository_root`).

    Raises :class:`SpecError` when the spec is not a file under ``root``: it would not
    travel with the job.
    """
    root = (root or repository_root()).resolve()
    spec = Path(spec_path).expanduser().resolve()
    try:
        relative = spec.relative_to(root)
    except ValueError:
        raise SpecError(
            f"job spec {str(spec_path)!r} is outside {root}, the folder `imagegen submit` uploads as the job's working "
            f"directory, so the cluster would not have it. Copy it under {root} (e.g. into {root / 'jobs'}) and submit "
            "that copy, or keep one spec and change fields with --set."
        ) from None
    arguments = ["python", ENTRYPOINT_SCRIPT, relative.as_posix()]
    for override in overrides:
        arguments += ["--set", override]
    return JobRequest(entrypoint=shlex.join(arguments), runtime_env={"working_dir": str(root)})


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
        deadline = time.monotonic() + _SETTLE_S
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
        "`ray dashboard cluster.yaml` / `kubectl port-forward`); and check the cluster is up (`ray status`)."
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


# -- the commands ---------------------------------------------------------------------------


def write(text: str) -> None:
    """Write ``text`` to stdout as is and flush: log chunks carry their own newlines."""
    sys.stdout.write(text)
    sys.stdout.flush()


def submit(
    spec_path: str,
    overrides: Sequence[str],
    address: Optional[str],
    wait: bool = True,
    out: Callable[[str], None] = write,
    announce: Callable[[str], None] = print,
) -> int:
    """``imagegen submit``: validate the spec here, submit it, write the job id to ``out``,
    then (``wait``) write the job's log to ``out`` until the job ends.

    Returns 0 when the job succeeded (or was submitted, without ``wait``), 1 when it
    failed or was stopped, 130 when interrupted while following (the job keeps running).
    Raises :class:`~pipeline.errors.ImagegenError` (spec, address, cluster) before or
    instead of submitting.
    """
    from pipeline.config import load_spec

    # Checked here first: a typo is one message now, not a failed job on the cluster later.
    spec = load_spec(spec_path, overrides)
    request = job_request(spec_path, overrides)
    dashboard = Dashboard(dashboard_address(address, spec))
    local = [name for name, url in (("input.url", spec.input.url), ("output.url", spec.output.url)) if "://" not in url]
    if local:
        announce(
            f"note: {' and '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}: on the cluster "
            "they are read and written on its nodes' own disks (relative paths inside the job's copy of the "
            "repository); use s3:// or a folder every node shares"
        )
    job_id = dashboard.submit(request)
    out(job_id + "\n")
    announce(f"submitted job {job_id} to {dashboard.address}: {request.entrypoint}")
    if not wait:
        announce(f"follow it with: imagegen logs {job_id} --address {dashboard.address} --follow")
        return 0
    return _follow_to_end(dashboard, job_id, out, announce)


def status(job_id: str, address: str, out: Callable[[str], None] = write) -> int:
    """``imagegen status``: write the job's status and details to ``out``. Returns 0, or 1
    when the job failed or was stopped."""
    dashboard = Dashboard(dashboard_address(address))
    info = dashboard.info(job_id)
    out(format_status(job_id, info) + "\n")
    return 1 if _failed(info) else 0


def logs(
    job_id: str,
    address: str,
    follow: bool = False,
    out: Callable[[str], None] = write,
    announce: Callable[[str], None] = print,
) -> int:
    """``imagegen logs``: write the job's log so far to ``out``, or (``follow``) all of it
    as it comes until the job ends. Returns 0, or 130 when interrupted while following."""
    dashboard = Dashboard(dashboard_address(address))
    if not follow:
        out(dashboard.logs(job_id))
        return 0
    try:
        dashboard.follow(job_id, out)
    except KeyboardInterrupt:
        announce(f"stopped following; job {job_id} goes on running on the cluster")
        return 130
    return 0


def _follow_to_end(dashboard: Dashboard, job_id: str, out: Callable[[str], None], announce: Callable[[str], None]) -> int:
    try:
        dashboard.follow(job_id, out)
        info = dashboard.final_info(job_id)
    except KeyboardInterrupt:
        announce(
            f"stopped following; job {job_id} goes on running on the cluster. Check it with "
            f"`imagegen status {job_id} --address {dashboard.address}`, stop it with "
            f"`ray job stop {job_id} --address {dashboard.address}`"
        )
        return 130
    if _failed(info):
        announce(f"job {job_id} {info.status.value}: {_headline(info.message)}")
        return 1
    announce(f"job {job_id} {info.status.value}")
    return 0


def _failed(info: Any) -> bool:
    return info.status.value in ("FAILED", "STOPPED")


def _headline(message: Optional[str]) -> str:
    # Ray appends the driver's last 20,000 characters of log to a failed job's message;
    # they were streamed already.
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "no message"
    return first.split(", last available logs")[0]


def format_status(job_id: str, info: Any) -> str:
    """A job's status, one fact per line, the status on the first line."""

    def when(ms: Optional[int]) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "-"

    lines = [f"{job_id} {info.status.value}", f"  message      {_headline(info.message)}"]
    lines.append(f"  entrypoint   {info.entrypoint}")
    lines.append(f"  started      {when(info.start_time)}")
    if info.end_time:
        lines.append(f"  ended        {when(info.end_time)}  ({(info.end_time - (info.start_time or info.end_time)) / 1000:.1f} s)")
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"  exit code    {info.driver_exit_code}")
    if getattr(info, "driver_node_id", None):
        lines.append(f"  driver node  {info.driver_node_id}")
    return "\n".join(lines)
