"""What a prompt step saves by computing the last position's logits only, one run, JSON on stdout.

The engine binds `logits_to_keep = 1` for a prompt step (export format 6); before, a prompt step ran
the LM head on every position (`logits_to_keep = 0`, which scoring still uses). For the fp32 and int4
exports of the default model, a 512-token prompt runs as one step:
  * time: the two settings alternate for --rounds rounds in one process; the ratio is the median of the
    per-round ratios, so the machine's drift cancels out;
  * memory: peak RSS (VmHWM) of a process that loads the engine, runs the prompt and decodes 63 tokens, one
    process per setting.

    python bench/bench_prefill.py [--rounds 8] [--out bench/results/prefill.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from bench_speed import peak_rss_mb
from prompts import LONG_PROMPT_TOKENS, filler_ids
from report import machine, publish

SETTINGS = {"last_only": 1, "all_positions": 0}


def prompt_step(engine, ids: list[int], keep: int):
    """(seconds, logits [1, vocab], cache) of one prompt step with this logits_to_keep."""
    cache = engine.new_cache(1, len(ids) + 64)
    cache.binding.bind_cpu_input("logits_to_keep", np.array([keep], np.int64))
    started = time.perf_counter()
    logits = engine.step(np.asarray([ids]), engine.batched_steering(None, 1), cache)
    return time.perf_counter() - started, logits, cache


def load(quantize: str):
    from grains_edge.runtime.bootstrap import ensure_export
    from grains_edge.runtime.engine import Engine

    engine = Engine(ensure_export("default", quantize), device="cpu")
    return engine, filler_ids(lambda text: engine.tokenizer.encode(text, add_special_tokens=False))


def timed(quantize: str, rounds: int) -> dict:
    engine, ids = load(quantize)
    times = {name: [] for name in SETTINGS}
    tokens = {}
    for _ in range(rounds):
        for name, keep in SETTINGS.items():
            seconds, logits, _ = prompt_step(engine, ids, keep)
            times[name].append(seconds)
            tokens[name] = int(logits[0].argmax())
    ratios = [a / b for a, b in zip(times["last_only"], times["all_positions"], strict=True)]
    return {
        **{f"{name}_ms": 1000 * statistics.median(t) for name, t in times.items()},
        "ratio_last_only_to_all": statistics.median(ratios),
        "same_first_token": tokens["last_only"] == tokens["all_positions"],
    }


def rss_worker(quantize: str, keep: int) -> dict:
    engine, ids = load(quantize)
    _, logits, cache = prompt_step(engine, ids, keep)
    steering = engine.batched_steering(None, 1)
    for _ in range(63):
        logits = engine.step(np.array([[int(logits[0].argmax())]]), steering, cache)
    return {"peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--rss-worker", nargs=2, metavar=("QUANTIZE", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker[0], int(args.rss_worker[1]))))
        return 0
    results = {}
    for quantize in ("none", "int4"):
        results[quantize] = timed(quantize, args.rounds)
        for name, keep in SETTINGS.items():
            worker = [sys.executable, __file__, "--rss-worker", quantize, str(keep)]
            output = subprocess.run(worker, check=True, capture_output=True, text=True).stdout
            results[quantize][f"{name}_peak_rss_mb"] = json.loads(output.splitlines()[-1])["peak_rss_mb"]
    report = {
        "prompt_tokens": LONG_PROMPT_TOKENS,
        "rounds": args.rounds,
        "machine": machine(),
        "results": results,
    }
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
