"""`grains-edge serve`: the OpenAI-compatible local server, a steering profile per request."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.options import DEVICES, PREFIX_CACHE_MB, QUANTIZATIONS, finite_float

API_KEY_VARIABLE = "GRAINS_EDGE_API_KEY"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server: continuous batching, steering per request"
    )
    parser.add_argument("--model", default="default", help="'default', an export folder, a model folder, .gguf or id")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS, help="weights of the export")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_VARIABLE})"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot (default 4 x batch)")
    parser.add_argument("--context", type=int, default=None, help="tokens per request, prompt + answer (default 2048)")
    parser.add_argument(
        "--prefix-cache",
        type=finite_float,
        default=PREFIX_CACHE_MB,
        metavar="MB",
        help=f"MiB of finished requests' KV reused by prompts that start alike (default {PREFIX_CACHE_MB}; 0: off)",
    )
    parser.add_argument("--profile", default=None, help="steering when a request names none (default: none)")
    parser.add_argument("--alpha", type=float, default=None, help="--profile's strength (default: the profile's own)")
    cluster = parser.add_argument_group("Ray Serve (pip install 'grains-edge[cluster]')")
    cluster.add_argument(
        "--ray", action="store_true", help="serve as a Ray Serve application: replicas, one engine each"
    )
    cluster.add_argument("--replicas", type=int, default=None, metavar="N", help="replicas (default 1)")
    cluster.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="replicas added as requests wait")
    cluster.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster (default $RAY_ADDRESS or a new local one)",
    )
    cluster.add_argument(
        "--replica-cpus", type=finite_float, default=None, metavar="C", help="CPUs Ray reserves per replica (default 1)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from grains_edge.runtime.bootstrap import ensure_builtin_profiles, ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.serve.server import build, check_limits, listen

    if not 0 < args.port < 65536:
        raise GrainsError(f"--port must be in 1-65535, got {args.port}; fix: pass e.g. 8000")
    if args.alpha is not None and args.profile in (None, "none"):
        raise GrainsError("--alpha sets the default profile's strength; fix: add --profile NAME")
    check_limits(args.max_batch, args.context, args.max_queue, args.prefix_cache)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    options = {  # server.build's, the same for one server and for each Ray replica
        "max_batch": args.max_batch,
        "context": args.context,
        "max_queue": args.max_queue,
        "profile": args.profile,
        "alpha": args.alpha,
        "api_key": api_key,
        "prefix_cache_mb": args.prefix_cache,
    }
    if args.ray:
        return run_on_ray(args, options)
    if (args.replicas, args.autoscale, args.ray_address, args.replica_cpus) != (None,) * 4:
        raise GrainsError("--replicas, --autoscale, --ray-address and --replica-cpus are Ray's; fix: add --ray")
    sock = listen(args.host, args.port)
    warn_if_open(args.host, api_key)
    export_dir = ensure_export(args.model, args.quantize)
    ensure_builtin_profiles(args.model)
    check_default_profile(export_dir, args.profile, args.alpha)
    engine = Engine(export_dir, device=args.device)
    app, batcher = build(engine, **options)
    batcher.start()
    print(
        f"[grains-edge] serving {export_dir.name} on http://{args.host}:{args.port}/v1 "
        f"({engine.provider}, batch {args.max_batch}, {batcher.capacity} tokens per request)",
        file=sys.stderr,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
    # uvicorn stops only when a signal asks it to, and raises ctrl+c again after its graceful shutdown; whether
    # that reaches us as KeyboardInterrupt depends on when asyncio's runner sees it, so the status is set here
    return 130 if server.should_exit else 0


def check_default_profile(export_dir: str | Path, profile: str | None, alpha: float | None) -> None:
    """--profile and --alpha checked against the export's manifest, before any engine loads: one line if bad."""
    from grains_edge.export.manifest import Manifest
    from grains_edge.serve.steering import SteeringError, SteeringResolver

    manifest = Manifest.load(export_dir)
    resolver = SteeringResolver((manifest.num_layers, manifest.hidden_size), manifest.weights_fingerprint)
    try:
        resolver.server_default(profile, alpha)
    except SteeringError as error:
        raise GrainsError(str(error)) from None


def warn_if_open(host: str, api_key: str | None) -> None:
    from grains_edge.serve.server import is_loopback

    if not is_loopback(host) and api_key is None:
        print(
            f"[grains-edge] listening on {host} without an API key: anyone who reaches it can use it "
            f"(set --api-key or ${API_KEY_VARIABLE})",
            file=sys.stderr,
        )


def run_on_ray(args: argparse.Namespace, options: dict) -> int:
    """The same app as Ray Serve replicas; this process stays until Ctrl-C, then removes them."""
    from grains_edge import paths
    from grains_edge.runtime.bootstrap import ensure_builtin_profiles, ensure_export
    from grains_edge.serve.server import listen

    if importlib.util.find_spec("ray") is None:
        raise GrainsError("--ray needs Ray Serve; fix: pip install 'grains-edge[cluster]'")
    from grains_edge.serve import ray_app

    scale = ray_app.parse_scale(args.replicas, args.autoscale)
    cpus = 1.0 if args.replica_cpus is None else args.replica_cpus
    if cpus <= 0:
        raise GrainsError(f"--replica-cpus must be above 0, got {cpus:g}; fix: pass e.g. 1 or 0.5")
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:  # a local Ray: its proxy will take the port, so a busy one is said now
        listen(args.host, args.port).close()
    warn_if_open(args.host, options["api_key"])
    export_dir = str(ensure_export(args.model, args.quantize))
    ensure_builtin_profiles(args.model)
    check_default_profile(export_dir, args.profile, args.alpha)
    gpus = 1 if args.device == "cuda" else 0  # Ray hides the GPUs from a replica that reserved none
    device = "cuda" if gpus else "cpu"
    settings = ray_app.ReplicaSettings(export_dir, str(paths.home().resolve()), options, device, cpus)
    ray_app.serve_until_stopped(settings, scale, args.host, args.port, address, gpus)
    return 0
