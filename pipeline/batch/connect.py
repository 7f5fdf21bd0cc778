"""Joining the Ray cluster a spec names, and failing within seconds (not minutes) when it
cannot be reached or lacks the GPUs the engine actors ask for."""

from __future__ import annotations

import logging
import socket

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.errors import ClusterError
from pipeline.batch.engine_actors import actor_gpus
from pipeline.spec.config import JobSpec, RuntimeConfig

log = logging.getLogger(__name__)


def connect(runtime: RuntimeConfig) -> None:
    """Join (or start) the Ray cluster the spec names; reuse one already initialised.

    Raises :class:`ClusterError` within seconds when ``runtime.address`` names a host and
    port nothing listens on: ``ray.init`` itself retries such an address for minutes
    (``ray://`` for 30 s) before giving up.
    """
    if ray.is_initialized():
        return
    advice = "Start a cluster with `ray start --head` and set runtime.address to the address it prints, or unset runtime.address to run on a local Ray."
    if runtime.address and runtime.address.startswith(("http://", "https://")):
        raise ClusterError(
            f"runtime.address {runtime.address!r} is a dashboard URL, which only `imagegen submit` uses. "
            "To run this spec on that cluster, use `imagegen submit SPEC --address URL`; to connect directly, "
            "set runtime.address to host:port, ray://host:10001 or auto."
        )
    if runtime.address not in (None, "auto", "local"):
        _probe(runtime.address, advice)
    try:
        ray.init(address=runtime.address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, TimeoutError) as exc:
        where = runtime.address or "a new local cluster"
        raise ClusterError(f"cannot reach Ray at {where}: {exc}. {advice}") from None


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Where the job's bookkeeping actors (the progress counter, the id registry) live: the
    driver's node, which outlives the job. On a worker, the loss of that node took the
    counter with it, and every read task then failed on its calls to it.

    Hard affinity, not soft: Ray places an actor that asks for no resources on a random
    node whatever a soft affinity says (ray-project/ray#25344 was fixed for hard affinity
    only; measured with Ray 2.60 here: 1 of 6 such actors landed on the named node), and
    these actors ask for none. The node cannot be missing: the driver runs on it."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _probe(address: str, advice: str, timeout_s: float = 5.0) -> None:
    """Fail fast unless something accepts TCP connections at ``address`` ([ray://]host:port)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"runtime.address {address!r} is not host:port, ray://host:port or auto. {advice}")
    hosts = [host]
    if host in ("127.0.0.1", "localhost"):
        # Ray itself swaps a loopback address for this node's IP; a head may listen only there.
        hosts.append(ray.util.get_node_ip_address())
    for candidate in hosts:
        try:
            socket.create_connection((candidate, int(port)), timeout=timeout_s).close()
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    raise ClusterError(f"cannot reach Ray at {address}: {reason} (nothing answers on port {port} of {host}). {advice}")


def require_gpus(spec: JobSpec) -> None:
    """Fail before any work when an engine actor asks for more GPUs than the cluster has:
    Ray would otherwise keep the actors pending, and the job waiting, forever."""
    gpus = actor_gpus(spec)
    have = ray.cluster_resources().get("GPU", 0)
    if gpus > have:
        asked = f"runtime.gpus_per_actor is {gpus:g}" if spec.runtime.gpus_per_actor is not None else "model.device is cuda"
        raise ClusterError(
            f"each engine actor needs {gpus:g} GPU(s) ({asked}), but the Ray cluster has {have:g} GPU(s), so the job "
            "would wait forever. To run on CPU, set model.device: cpu (or auto) and leave runtime.gpus_per_actor "
            "unset; or set runtime.address to a cluster with GPUs (an autoscaling one must keep a GPU worker up)."
        )
