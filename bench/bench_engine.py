"""Engine benchmark on the default model, one run, JSON on stdout.

Measures, with the same prompt and the same steering:
  * decode tokens/s and time to first token: this ONNX Runtime engine vs PyTorch eager `generate`
    with the steering applied by forward hooks;
  * the engine with all-zero steering vs a graph exported with no steered layer (steering overhead);
  * the time to switch profiles (building the next call's steering tensor);
  * the memory-bandwidth roofline: bytes of weights read per decoded token and the tokens/s the
    machine's measured bandwidth allows.
Repetitions are interleaved (A, B, A, B, …) and medians reported, so machine noise hits both sides.

    python bench/bench_engine.py [--tokens 64] [--repeats 5] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from engine_runs import engine_run, engine_stream_run
from prompts import PROMPT
from read_bandwidth import bytes_per_second
from report import machine, publish

from grains_edge.export.onnx_export import export
from grains_edge.model import sources
from grains_edge.model.hooks import steering_hooks
from grains_edge.runtime.bootstrap import ensure_export, export_dir_for
from grains_edge.runtime.engine import Engine


def weight_bytes_per_token(model) -> int:
    """Every weight matrix is read once per decoded token, except the embedding lookup (one row);
    a tied LM head reads the embedding matrix in full."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()


def torch_loop_run(model, ids: list[int], steering: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of a hand-written PyTorch eager KV-cache loop with hooks."""
    input_ids = torch.tensor([ids])
    with torch.inference_mode(), steering_hooks(model, steering):
        started = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        first = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens - 1):
            out = model(input_ids=token, cache=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        done = time.perf_counter()
    return first - started, (tokens - 1) / (done - first)


def torch_generate_run(model, ids: list[int], steering: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of transformers `generate` (greedy) with the hooks:
    first token = a 1-token generate; decode rate from the extra time of a `tokens`-token generate."""
    input_ids = torch.tensor([ids])
    timings = []
    with torch.inference_mode(), steering_hooks(model, steering):
        for count in (1, tokens):
            started = time.perf_counter()
            model.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
            timings.append(time.perf_counter() - started)
    return timings[0], (tokens - 1) / (timings[1] - timings[0])


def switch_time(engine: Engine, profiles: list[np.ndarray], repeats: int = 1000) -> float:
    """Seconds to make the next call use another profile: build its steering tensor for the session."""
    started = time.perf_counter()
    for i in range(repeats):
        engine.batched_steering(profiles[i % len(profiles)], 1)
    return (time.perf_counter() - started) / repeats


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    steered_dir = ensure_export(args.model)
    plain_dir = export_dir_for(args.model).with_name(export_dir_for(args.model).name + "-unsteered")
    if not (plain_dir / "manifest.json").is_file():
        export(args.model, plain_dir, layers_spec="none")
    engine = Engine(steered_dir, device="cpu", threads=threads)
    plain = Engine(plain_dir, device="cpu", threads=threads)
    model, _ = sources.load(args.model)
    ids = engine.chat_ids(PROMPT)

    rng = np.random.default_rng(0)
    steering = engine.zero_steering()
    middle = engine.num_layers // 3, 2 * engine.num_layers // 3
    steering[middle[0] : middle[1]] = rng.normal(0, 1, (middle[1] - middle[0], engine.hidden_size))
    steering *= 4.0 / np.linalg.norm(steering, axis=-1, keepdims=True).clip(1e-6)
    steering_torch = torch.from_numpy(steering)[None]

    names = ("engine", "torch_generate", "torch_loop", "engine_zero", "unsteered_graph", "stream")
    runs: dict[str, list] = {name: [] for name in names}
    engine_run(engine, ids, steering, 8), torch_loop_run(model, ids, steering_torch, 8)  # warm-up
    for _ in range(args.repeats):
        runs["engine"].append(engine_run(engine, ids, steering, args.tokens))
        runs["torch_generate"].append(torch_generate_run(model, ids, steering_torch, args.tokens))
        runs["torch_loop"].append(torch_loop_run(model, ids, steering_torch, args.tokens))
        runs["engine_zero"].append(engine_run(engine, ids, engine.zero_steering(), args.tokens))
        runs["unsteered_graph"].append(engine_run(plain, ids, None, args.tokens))
        runs["stream"].append((0.0, engine_stream_run(engine, ids, steering, args.tokens)))

    def summary(name: str) -> dict:
        return {
            "time_to_first_token_ms": 1000 * median([r[0] for r in runs[name]]),
            "decode_tokens_per_second": median([r[1] for r in runs[name]]),
        }

    bandwidth = bytes_per_second()
    per_token = weight_bytes_per_token(model)
    roofline = bandwidth / per_token
    result = {
        "model": args.model,
        "prompt_tokens": len(ids),
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "threads": threads,
        "machine": machine(),
        "engine_fp32_steered": summary("engine"),
        "engine_fp32_steered_streaming_api": {"decode_tokens_per_second": median([r[1] for r in runs["stream"]])},
        "pytorch_eager_generate_hooks": summary("torch_generate"),
        "pytorch_eager_kv_loop_hooks": summary("torch_loop"),
        "engine_zero_steering": summary("engine_zero"),
        "graph_without_steering": summary("unsteered_graph"),
        "profile_switch_ms": 1000 * switch_time(engine, [steering, -steering, engine.zero_steering()]),
        "roofline": {
            "weight_bytes_per_token": per_token,
            "measured_bandwidth_gb_per_s": bandwidth / 1e9,
            "bandwidth_bound_tokens_per_second": roofline,
        },
    }
    engine_tps = result["engine_fp32_steered"]["decode_tokens_per_second"]
    result["ratios"] = {
        "engine_vs_pytorch_generate_decode": engine_tps
        / result["pytorch_eager_generate_hooks"]["decode_tokens_per_second"],
        "engine_vs_pytorch_kv_loop_decode": engine_tps
        / result["pytorch_eager_kv_loop_hooks"]["decode_tokens_per_second"],
        "engine_fraction_of_roofline": engine_tps / roofline,
        "steering_overhead": result["graph_without_steering"]["decode_tokens_per_second"]
        / result["engine_zero_steering"]["decode_tokens_per_second"]
        - 1.0,
    }
    publish(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
