"""Soak `grains-edge serve`: mixed clients for `--minutes` (30 by default), random profiles, random disconnects.

A server runs in its own process (`--max-batch 8`, a small queue so 429s happen); `--clients` tasks each
loop until the time is up, picking at random: streaming or not, a profile (none, a built-in, a mix, or an
intended bad one: an unknown profile or a non-finite α), max_tokens, and, for a third of the streams,
a disconnect after a random number of chunks. Every outcome is classified:
  complete   a full answer (non-streaming: finish_reason and usage; streaming: a finish chunk and [DONE])
  cancelled  a stream this script dropped on purpose
  refused    an intended error: 400 for the bad requests, 429 (queue full, with Retry-After)
  unexpected anything else (a 5xx, a stream that ended early, a 400 for a good request, a transport error)
The server's resident memory (VmRSS) is read after a warm-up minute and at the end. Done when: no
unexpected outcome and RSS growth < 5 %.

    python bench/bench_serve_soak.py --model EXPORT_DIR [--minutes 30] [--clients 12]
        [--out bench/results/serve_soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_serve import QUESTIONS, free_port, start_server
from report import machine, publish

BUILTINS = ["truthful", "no-sycophancy", "refuse-harmful", "no-hallucination"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def random_request(rng: random.Random) -> tuple[dict, bool]:
    """A request body and whether the server must refuse it."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "max_tokens": rng.randint(1, 96),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randint(0, 1000),
    }
    kind = rng.random()
    if kind < 0.05:
        return {**body, "steering": {"profile": "no-such-profile"}}, True
    if kind < 0.1:
        return {**body, "steering": {"profile": "truthful", "alpha": "NaN-as-text"}}, True
    if kind < 0.3:
        return body, False
    if kind < 0.5:
        mix = [{"profile": p, "weight": rng.uniform(0.2, 1.0)} for p in rng.sample(BUILTINS, 2)]
        return {**body, "steering": {"mix": mix}}, False
    return {**body, "steering": {"profile": rng.choice(BUILTINS)}}, False


async def one_request(http: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    body, bad = random_request(rng)
    stream = rng.random() < 0.6
    drop_after = rng.randint(1, 20) if stream and rng.random() < 0.33 else None
    try:
        if not stream:
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            if response.status_code == 429 and response.headers.get("Retry-After"):
                return "refused"
            if bad:
                return "refused" if response.status_code == 400 else "unexpected"
            answer = response.json()
            ok = response.status_code == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
            return "complete" if ok and answer["usage"]["completion_tokens"] >= 0 else "unexpected"
        async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as response:
            if response.status_code == 429 and response.headers.get("Retry-After"):
                return "refused"
            if bad:
                return "refused" if response.status_code == 400 else "unexpected"
            if response.status_code != 200:
                return "unexpected"
            chunks, finished, done = 0, False, False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "unexpected"
                chunks += 1
                finished = finished or any(c.get("finish_reason") for c in chunk["choices"])
                if drop_after is not None and chunks >= drop_after and not finished:
                    return "cancelled"  # leaving the block closes the connection mid-stream
            return "complete" if finished and done else "unexpected"
    except httpx.HTTPError:
        return "unexpected"


async def client_loop(url: str, seed: int, deadline: float, outcomes: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300) as http:
        while time.monotonic() < deadline:
            outcomes[await one_request(http, url, rng)] += 1
            if outcomes["refused"] and rng.random() < 0.1:
                await asyncio.sleep(rng.uniform(0, 1))


async def soak(url: str, clients: int, seconds: float) -> Counter:
    outcomes: Counter = Counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(url, seed, deadline, outcomes) for seed in range(clients)))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an export folder")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "grains_edge.cli", "serve", "--model", str(args.model), "--port", str(port)]
    command += ["--max-batch", "8", "--max-queue", "4", "--context", "512"]
    process = start_server(command, port)
    url = f"http://127.0.0.1:{port}"
    try:
        warmup = min(60.0, args.minutes * 60 / 10)
        asyncio.run(soak(url, args.clients, warmup))
        rss_start = rss_mb(process.pid)
        started = time.monotonic()
        outcomes = asyncio.run(soak(url, args.clients, args.minutes * 60 - warmup))
        elapsed = time.monotonic() - started
        rss_end = rss_mb(process.pid)
        health = httpx.get(f"{url}/health").json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    growth = 100 * (rss_end - rss_start) / rss_start
    result = {
        "model": str(args.model),
        "note": args.note,
        "minutes": round((elapsed + warmup) / 60, 2),
        "clients": args.clients,
        "outcomes": dict(outcomes),
        "requests": sum(outcomes.values()),
        "rss_mb_after_warmup": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_percent": round(growth, 2),
        "health_at_end": health,
        "machine": machine(),
        "passed": outcomes["unexpected"] == 0 and growth < 5 and health["active"] == 0,
    }
    publish(result, args.out)


if __name__ == "__main__":
    main()
