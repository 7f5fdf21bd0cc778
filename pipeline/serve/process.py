"""``imagegen serve`` as a process: start, serve until told to stop, drain, exit 0.

Two processes, so that a signal to the whole process group (systemd's, a shell's Ctrl-C,
``kill -TERM -PGID``) cannot reach Ray's own processes behind our back:

- the **supervisor** (the command the user ran) starts the server as a child in a
  session of its own, forwards SIGTERM, SIGINT and SIGHUP to it, and exits with its code;
- the **server** (the child) starts or joins Ray, deploys the app, and on the first
  signal drains: new requests get 503, those in flight get up to ``serve.shutdown_grace_s``
  to finish (:mod:`.drain`), then it shuts down and exits 0. A second SIGINT (Ctrl-C)
  skips the rest of the wait.

The deadline holds whatever is running: the process is gone within ``shutdown_grace_s +
SHUTDOWN_MARGIN_S`` of the signal. Requests still running at the end of the grace period
are cut off by killing the server's own Ray processes outright (an orderly
``ray.shutdown()`` under a running generation waits for its workers, 11 s past the grace
at high load); an idle shutdown is orderly, and a watchdog kills what is left if even that
overruns the margin (still exit 0: the stop asked for is done). Supervisors' stop timeouts (systemd ``TimeoutStopSec``, a
pod's ``terminationGracePeriodSeconds``) need to be at least the sum.

Without the split, a local Ray started by ``ray.init`` shares our process group: a group
SIGTERM kills its raylet and GCS at once, in-flight requests fail and the driver hangs
on a dead cluster. If the supervisor itself is killed, the kernel sends the server
SIGTERM (``PR_SET_PDEATHSIG``), so it still drains.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, NoReturn

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
# After shutdown_grace_s, this long for the shutdown itself (killing Ray's processes takes
# well under a second; an orderly shutdown of an idle local Ray, a few): the process is
# gone within shutdown_grace_s + SHUTDOWN_MARGIN_S of the signal. README and infra/ agree.
SHUTDOWN_MARGIN_S = 5.0


def supervise(child_argv: list[str]) -> NoReturn:
    """Run ``python child_argv...`` in a new session, forward stop signals to it, and exit
    with its exit code (128 + N if signal N killed it) as soon as it has exited.

    At once (``os._exit``): the supervisor holds nothing to clean up, and the interpreter's
    teardown of what the command imported (torch, Ray) took 3 s on a loaded machine,
    counted against the stop deadline (``shutdown_grace_s + SHUTDOWN_MARGIN_S``)."""
    child = subprocess.Popen([sys.executable, *child_argv], start_new_session=True, preexec_fn=_die_with_parent)
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: _forward(child, signum))
    code = child.wait()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if code >= 0 else 128 - code)


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
        deadline = time.monotonic() + sv.shutdown_grace_s
        _watchdog(deadline + SHUTDOWN_MARGIN_S, announce)
        cut_off = _drain(drain, deadline, sv.shutdown_grace_s, signals.name, announce)
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


def _drain(drain: "ray.actor.ActorHandle", deadline: float, grace_s: float, why: str, announce: Callable[[str], None]) -> int:
    """Refuse new requests, wait until ``deadline`` (monotonic) at most for those in
    flight; return how many were still in flight at the end (-1: the coordinator did not
    answer in time, so unknown)."""
    try:
        in_flight = ray.get(drain.drain.remote(), timeout=max(0.1, deadline - time.monotonic()))
    except ray.exceptions.GetTimeoutError:
        announce(f"the drain coordinator did not answer within serve.shutdown_grace_s={grace_s:g}; stopping now")
        return -1
    announce(f"{why}: taking no new requests (503); waiting up to {grace_s:g} s for {in_flight} in flight (Ctrl-C again to stop now)")
    while in_flight:
        left = deadline - time.monotonic()
        if left <= 0:
            announce(f"grace period (serve.shutdown_grace_s={grace_s:g}) over with {in_flight} request(s) still in flight: they are cut off")
            return in_flight
        # One-second slices: the main thread stays free to take a second Ctrl-C. A slow
        # answer (a loaded machine) is no reason to cut requests off before the deadline:
        # ask again, but never past it.
        try:
            in_flight = ray.get(drain.wait_idle.remote(min(left, 1.0)), timeout=left)
        except ray.exceptions.GetTimeoutError:
            continue
    announce("no request in flight")
    return 0


def _shut_down(joined: bool, idle: bool) -> None:
    """Idle: an orderly shutdown (on a cluster we joined, our app deleted; Serve too if it
    was the last). Requests cut off: nothing is waited for. Our own Ray's processes are
    killed and the process exits 0 at once (an orderly shutdown would wait for the
    generations still running, and so would Ray's exit handler); a joined cluster keeps
    running, without our app."""
    if not idle and not joined:
        _kill_own_processes()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    try:
        if joined and ray.is_initialized():
            serve.delete(APP_NAME, _blocking=idle)
            if idle and not serve.status().applications:
                serve.shutdown()
    finally:
        ray.shutdown()


def _watchdog(at: float, announce: Callable[[str], None]) -> None:
    """At monotonic time ``at``, if the process is still here: say so, kill our Ray's
    processes and exit 0 (the stop was asked for), whatever the main thread is stuck in."""

    def expire() -> None:
        time.sleep(max(0.0, at - time.monotonic()))
        announce(f"the shutdown did not finish within serve.shutdown_grace_s + {SHUTDOWN_MARGIN_S:g} s: stopping Ray's processes now")
        _kill_own_processes()
        os._exit(0)

    threading.Thread(target=expire, name="shutdown-deadline", daemon=True).start()


def _kill_own_processes() -> None:
    """SIGKILL every process this server started: its descendants, and, when it leads its
    session (``imagegen serve`` starts it so), the rest of its session, which Ray's
    daemons stay in even once re-parented. Never anything outside them."""
    me = os.getpid()
    table = _process_table()
    doomed = set()
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in doomed]
        doomed.update(children)
        frontier += children
    if os.getsid(0) == me:
        doomed.update(pid for pid, (_, sid) in table.items() if sid == me)
    doomed.discard(me)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id), from /proc (Linux; elsewhere empty: nothing killed)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                # The command name may hold spaces and parentheses; fields resume after the last ')'.
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


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

