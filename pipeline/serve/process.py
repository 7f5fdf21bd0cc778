"""``imagegen serve`` as a process: start, serve until told to stop, drain, exit 0.

Two processes, so that a signal to the whole process group (systemd's, a shell's Ctrl-C,
``kill -TERM -PGID``) cannot reach Ray's own processes behind our back:

- the **supervisor** (the command the user ran) starts the server as a child in a
  session of its own, forwards SIGTERM, SIGINT and SIGHUP to it, and exits with its code;
- the **server** (the child) starts or joins Ray, deploys the app, and on the first
  signal drains: new requests get 503, those in flight get up to ``serve.shutdown_grace_s``
  to finish (:mod:`.drain`), then it shuts down and exits 0. A second SIGINT (Ctrl-C)
  skips the rest of the wait.

Without the split, a local Ray started by ``ray.init`` shares our process group: a group
SIGTERM kills its raylet and GCS at once, in-flight requests fail and the driver hangs
on a dead cluster. If the supervisor itself is killed, the kernel sends the server
SIGTERM (``PR_SET_PDEATHSIG``), so it still drains.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import ray
from ray import serve

from pipeline.errors import ImagegenError
from pipeline.batch.connect import connect
from pipeline.serve.app import APP_NAME, start
from pipeline.serve.auth import check_exposure, load_key_digests
from pipeline.serve.drain import NAMESPACE, DrainState, actor_name
from pipeline.spec.config import JobSpec

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def supervise(child_argv: list[str]) -> int:
    """Run ``python child_argv...`` in a new session, forward stop signals to it, and
    return its exit code (128 + N if signal N killed it)."""
    child = subprocess.Popen([sys.executable, *child_argv], start_new_session=True, preexec_fn=_die_with_parent)
    previous = {signum: signal.signal(signum, lambda signum, frame: _forward(child, signum)) for signum in FORWARDED}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code if code >= 0 else 128 - code


def _forward(child: subprocess.Popen, signum: int) -> None:
    if child.poll() is None:
        child.send_signal(signum)


def _die_with_parent() -> None:
    # In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class StopSignals:
    """The server's stop signals: the first sets :attr:`received`; a second SIGINT (Ctrl-C
    twice) raises KeyboardInterrupt: stop waiting for requests in flight.

    A repeated SIGTERM or SIGHUP changes nothing: Kubernetes and systemd escalate with
    SIGKILL, not with another SIGTERM, and the parent-death signal can come more than once
    (once per thread of a killed multi-threaded supervisor, as the kernel reparents us).
    """

    def __init__(self) -> None:
        self.received = threading.Event()
        self.name = ""
        self._previous = {signum: signal.signal(signum, self._handle) for signum in FORWARDED}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.name = signal.Signals(signum).name
        self.received.set()

    def wait(self) -> None:
        # Bounded waits keep the main thread able to run the signal handler.
        while not self.received.wait(timeout=1.0):
            pass

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def serve_until_interrupted(spec: JobSpec, announce: Callable[[str], None] = print) -> None:
    """The server: connect to Ray as the batch job does (a new local Ray unless
    ``runtime.address`` names one), deploy, serve until SIGTERM, SIGINT or SIGHUP, drain
    (503 for new requests, up to ``serve.shutdown_grace_s`` for those in flight), then
    shut down: on a Ray it started, Ray goes with it; on a cluster it joined, the app is
    deleted (and Serve shut down when no other app is left)."""
    sv = spec.serve
    if spec.runtime.address is None:
        _check_port_free(sv.host, sv.port)
    check_exposure(sv.host, sv, load_key_digests(sv))  # before Ray starts: a refusal costs nothing
    connect(spec.runtime)
    # After ray.init, which installs a SIGTERM handler of its own (exit at once) in the driver.
    signals = StopSignals()
    cut_off = 0
    try:
        drain = DrainState.options(name=actor_name(APP_NAME), namespace=NAMESPACE).remote()
        url = start(spec, drain=actor_name(APP_NAME))
        announce(f"serving {', '.join(spec.named_models())} at {url}/v1/images/generations (Ctrl-C or SIGTERM to stop)")
        signals.wait()
        cut_off = _drain(drain, sv.shutdown_grace_s, signals.name, announce)
    except KeyboardInterrupt:
        announce("SIGINT again: stopping now, without waiting for requests in flight")
        cut_off = -1
    except BaseException as exc:  # SystemExit too: say why before Ray goes down
        # Said before the shutdown, in case the shutdown itself cannot finish.
        announce(f"stopping on {type(exc).__name__}: {exc}")
        raise
    finally:
        announce("shutting down")
        try:
            _shut_down(joined=spec.runtime.address is not None, idle=cut_off == 0)
        finally:
            signals.restore()


def _drain(drain: "ray.actor.ActorHandle", grace_s: float, why: str, announce: Callable[[str], None]) -> int:
    """Refuse new requests, wait up to ``grace_s`` for those in flight; return how many
    were still in flight at the end."""
    in_flight = ray.get(drain.drain.remote(), timeout=30)
    announce(f"{why}: taking no new requests (503); waiting up to {grace_s:g} s for {in_flight} in flight (Ctrl-C again to stop now)")
    deadline = time.monotonic() + grace_s
    while in_flight:
        left = deadline - time.monotonic()
        if left <= 0:
            announce(f"grace period (serve.shutdown_grace_s={grace_s:g}) over with {in_flight} request(s) still in flight: they are cut off")
            return in_flight
        # One-second slices: the main thread stays free to take a second Ctrl-C. A slow
        # answer (a loaded machine) is no reason to cut requests off: ask again.
        try:
            in_flight = ray.get(drain.wait_idle.remote(min(left, 1.0)), timeout=min(left, 1.0) + 30)
        except ray.exceptions.GetTimeoutError:
            continue
    announce("no request in flight")
    return 0


def _shut_down(joined: bool, idle: bool) -> None:
    try:
        if joined and ray.is_initialized():
            # A cluster we only joined lives on: remove our app; Serve too if it was the last.
            serve.delete(APP_NAME, _blocking=idle)
            if idle and not serve.status().applications:
                serve.shutdown()
        # A local Ray we started goes with ray.shutdown(); nothing is in flight (or what is
        # left was given its grace period), so there is nothing to wait for.
    finally:
        ray.shutdown()


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


def child_argv(spec_path: str, overrides: list[str]) -> list[str]:
    """The server's command line (after ``python``): this CLI, in-process."""
    argv = ["-m", "pipeline.cli", "serve", spec_path, "--in-process"]
    for override in overrides:
        argv += ["--set", override]
    return argv

