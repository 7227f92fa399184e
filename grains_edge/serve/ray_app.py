"""`grains-edge serve --ray`: the same OpenAI-compatible app as a Ray Serve deployment.

Each replica is one Ray actor that builds the app exactly as `grains-edge serve` does (server.build: one
engine, one continuous batcher) and hands it to Ray as its ASGI app. Ray's HTTP proxy takes the requests and
its router sends each to the less busy of two replicas picked at random; Ray restarts a replica that dies or
whose batcher stops, and with autoscaling adds or removes replicas by the requests per replica.

Replicas read the export and the user's profiles from the driver's GRAINS_EDGE_HOME path: on one machine that
is the same folder, on a cluster it must be shared storage (every replica lists the same profiles).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

import ray
from ray import serve

from grains_edge.errors import GrainsError
from grains_edge.runtime.engine import Engine
from grains_edge.serve.server import build, queue_size

APP_NAME = "grains-edge"
REPLICA_HEADER = "x-grains-edge-replica"
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # as `grains-edge serve`: warnings and errors


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica needs to build its app: sent to each replica actor by Ray."""

    export_dir: str
    home: str  # GRAINS_EDGE_HOME of every replica: where the user's profiles are
    options: dict  # server.build's keyword arguments; max_batch at least
    device: str = "cpu"  # "cuda" only with a GPU reserved: Ray hides the GPUs from the others
    cpus: float = 1.0  # Ray's CPU reservation per replica; the engine runs ceil(cpus) threads

    @property
    def threads(self) -> int:
        return max(1, math.ceil(self.cpus))

    @property
    def max_batch(self) -> int:
        return self.options["max_batch"]

    @property
    def requests_held(self) -> int:
        """Requests one replica's batcher holds: its batch and its queue (sized as server.build sizes it)."""
        return self.max_batch + queue_size(self.max_batch, self.options.get("max_queue"))


@dataclass(frozen=True)
class Scale:
    """A fixed replica count (`minimum == maximum`) or an autoscaling range."""

    minimum: int
    maximum: int

    @property
    def fixed(self) -> bool:
        return self.minimum == self.maximum


def parse_scale(replicas: int | None, autoscale: str | None) -> Scale:
    """`--replicas N` or `--autoscale MIN:MAX` (one at most) -> Scale; neither: one replica."""
    if replicas is not None and autoscale is not None:
        raise GrainsError("--replicas and --autoscale exclude each other; fix: pass one of them")
    if autoscale is None:
        count = 1 if replicas is None else replicas
        if count < 1:
            raise GrainsError(f"--replicas must be at least 1, got {count}; fix: pass e.g. 2")
        return Scale(count, count)
    low, _, high = autoscale.partition(":")
    if not (low.isdigit() and high.isdigit()) or int(low) > int(high) or int(high) < 1:
        raise GrainsError(f"--autoscale takes MIN:MAX with 0 <= MIN <= MAX, MAX >= 1, got {autoscale!r}; fix: e.g. 1:4")
    return Scale(int(low), int(high))


class ReplicaHeader:
    """ASGI middleware naming the replica that answered in a response header (streams too, as plain ASGI)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, tagged)


@serve.deployment(name="GrainsEdge")
@serve.ingress()
class Replica:
    """One engine and its batcher behind the app of server.build; the header names this replica's actor."""

    def __init__(self, settings: ReplicaSettings):
        engine = Engine(settings.export_dir, device=settings.device, threads=settings.threads)
        self.api, self.batcher = build(engine, **settings.options)  # `app` is Ray's own attribute
        actor_name = serve.get_replica_context().replica_id.to_full_id_str()  # ray.get_actor(name, "serve")
        self.api.add_middleware(ReplicaHeader, replica=actor_name)
        self.batcher.start()

    def __serve_build_asgi_app__(self):
        return self.api

    def check_health(self) -> None:
        """Ray replaces a replica whose batcher thread has stopped (every request to it would hang)."""
        if not self.batcher.thread.is_alive():
            raise RuntimeError("the batcher thread has stopped")

    def __del__(self) -> None:
        if hasattr(self, "batcher"):  # Ray calls this after a failed __init__ too
            self.batcher.close()


def application(settings: ReplicaSettings, scale: Scale, gpus: float = 0):
    """The bound Ray Serve application: `scale` replicas of `settings`, each with `gpus` GPUs."""
    env = {"GRAINS_EDGE_HOME": settings.home}
    if os.environ.get("GRAINS_EDGE_CACHE"):  # compiled kernels: built once, not once per replica
        env["GRAINS_EDGE_CACHE"] = os.environ["GRAINS_EDGE_CACHE"]
    actor_options = {"num_cpus": settings.cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}}
    if scale.fixed:
        sizing = {"num_replicas": scale.minimum}
    else:
        # Ray counts requests running on replicas and waiting in its router: a full batch each is the target
        limits = {"min_replicas": scale.minimum, "max_replicas": scale.maximum}
        sizing = {"autoscaling_config": {**limits, "target_ongoing_requests": settings.max_batch}}
    deployment = Replica.options(
        ray_actor_options=actor_options,
        # one more than the batcher holds: a request over its queue reaches it and gets one server's 429
        max_ongoing_requests=settings.requests_held + 1,
        logging_config=QUIET,
        **sizing,
    )
    return deployment.bind(settings)


def deploy(app, host: str, port: int) -> None:
    """Run `app` behind Ray's HTTP proxy on host:port, on the connected Ray cluster; returns once it serves."""
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # a replica's constructor failed: Ray printed its traceback above
        raise GrainsError(f"Ray could not start the replicas ({error}); fix: see the replica errors above") from None


def check_room(scale: Scale, cpus: float, gpus: float) -> None:
    """A one-line error when the cluster cannot hold the replicas asked for (Ray would wait for them forever)."""
    resources = ray.cluster_resources()
    count = max(scale.minimum, 1)
    for kind, each, fix in (("CPU", cpus, "a smaller --replica-cpus"), ("GPU", gpus, "--device cpu")):
        if count * each > resources.get(kind, 0.0):
            raise GrainsError(
                f"{count} replicas × {each:g} {kind} = {count * each:g}, the Ray cluster has "
                f"{resources.get(kind, 0.0):g}; fix: fewer replicas, or {fix}"
            )


def serve_until_stopped(
    settings: ReplicaSettings, scale: Scale, host: str, port: int, address: str | None, gpus: float
) -> None:
    """Start (or join, with `address`) a Ray cluster, serve on it until SIGINT/SIGTERM, then remove the app."""
    ray.init(address=address, logging_level="WARNING")
    try:
        if address is None:  # a cluster may add nodes for what it lacks; a local Ray cannot
            check_room(scale, settings.cpus, gpus)
        deploy(application(settings, scale, gpus), host, port)
        replicas = f"{scale.minimum}" if scale.fixed else f"{scale.minimum}-{scale.maximum} (autoscaling)"
        print(
            f"[grains-edge] serving {os.path.basename(settings.export_dir)} on http://{host}:{port}/v1 through Ray "
            f"({replicas} replicas, batch {settings.max_batch} each); Ctrl-C stops",
            file=sys.stderr,
        )
        stopped = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopped.set())
        stopped.wait()
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
