"""`grains-edge serve`: the OpenAI-compatible local server, a steering profile per request."""

from __future__ import annotations

import argparse
import os
import sys

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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from grains_edge.runtime.bootstrap import ensure_builtin_profiles, ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.serve.server import build, check_limits, is_loopback, listen

    if not 0 < args.port < 65536:
        raise GrainsError(f"--port must be in 1-65535, got {args.port}; fix: pass e.g. 8000")
    if args.alpha is not None and args.profile in (None, "none"):
        raise GrainsError("--alpha sets the default profile's strength; fix: add --profile NAME")
    check_limits(args.max_batch, args.context, args.max_queue, args.prefix_cache)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    sock = listen(args.host, args.port)
    if not is_loopback(args.host) and api_key is None:
        print(
            f"[grains-edge] listening on {args.host} without an API key: anyone who reaches it can use it "
            f"(set --api-key or ${API_KEY_VARIABLE})",
            file=sys.stderr,
        )
    export_dir = ensure_export(args.model, args.quantize)
    ensure_builtin_profiles(args.model)
    engine = Engine(export_dir, device=args.device)
    app, batcher = build(
        engine,
        args.max_batch,
        args.context,
        args.max_queue,
        args.profile,
        args.alpha,
        api_key,
        prefix_cache_mb=args.prefix_cache,
    )
    batcher.start()
    print(
        f"[grains-edge] serving {export_dir.name} on http://{args.host}:{args.port}/v1 "
        f"({engine.provider}, batch {args.max_batch}, {batcher.capacity} tokens per request)",
        file=sys.stderr,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
    return 0
