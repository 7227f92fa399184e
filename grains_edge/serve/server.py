"""Assemble and run the server: engine -> batcher -> app, on a socket bound before uvicorn starts."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.options import PREFIX_CACHE_MB
from grains_edge.runtime.engine import Engine
from grains_edge.serve.api import MAX_BODY, create_app
from grains_edge.serve.batcher import Batcher, Job
from grains_edge.serve.steering import SteeringResolver

DEFAULT_CONTEXT = 2048  # tokens per slot: each slot's KV buffer is sized for it (memory grows as it fills)


def build(
    engine: Engine,
    max_batch: int = 8,
    context: int | None = None,
    max_queue: int | None = None,
    profile: str | None = None,
    alpha: float | None = None,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
    on_logits: Callable[[Job, int, np.ndarray], None] | None = None,
    prefix_cache_mb: float = PREFIX_CACHE_MB,
):
    """(FastAPI app, Batcher) over `engine`; the batcher is not started yet."""
    check_limits(max_batch, context, max_queue, prefix_cache_mb)
    capacity = min(context or DEFAULT_CONTEXT, engine.max_context)
    resolver = SteeringResolver((engine.num_layers, engine.hidden_size), engine.manifest.weights_fingerprint)
    resolver.default = resolver.server_default(profile, alpha)
    queue = queue_size(max_batch, max_queue)
    batcher = Batcher(engine, max_batch, capacity, queue, on_logits, int(prefix_cache_mb * 2**20))
    app = create_app(engine, batcher, resolver, engine.export_dir.name, api_key, max_body)
    return app, batcher


def queue_size(max_batch: int, max_queue: int | None) -> int:
    """Requests that may wait for a slot: `--max-queue`, or four batches' worth."""
    return 4 * max_batch if max_queue is None else max_queue


def check_limits(
    max_batch: int, context: int | None, max_queue: int | None, prefix_cache_mb: float = PREFIX_CACHE_MB
) -> None:
    """One-line errors for limits that cannot work (checked before the model loads)."""
    if max_batch < 1:
        raise GrainsError(f"--max-batch must be at least 1, got {max_batch}; fix: pass e.g. 8")
    if context is not None and context < 2:
        raise GrainsError(f"--context must be at least 2 tokens, got {context}; fix: pass e.g. 2048")
    if max_queue is not None and max_queue < 0:
        raise GrainsError(f"--max-queue must be 0 or more, got {max_queue}; fix: pass e.g. 32")
    if not prefix_cache_mb >= 0:
        raise GrainsError(f"--prefix-cache must be 0 (off) or more MiB, got {prefix_cache_mb}; fix: pass e.g. 256")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (a busy port is the usual one)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise GrainsError(f"cannot listen on {host}:{port} ({error.strerror}); fix: pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
