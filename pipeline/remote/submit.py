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

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.remote.dashboard import Dashboard, JobRequest, dashboard_address
from pipeline.errors import ClusterError, SpecError

# The job's entrypoint script, relative to the repository root (the job's working_dir).
ENTRYPOINT_SCRIPT = "jobs/generate.py"


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
    from pipeline.spec.load import load_spec

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
