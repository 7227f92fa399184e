"""Speed of every way to run the default model with a steering vector, side by side, one run, JSON.

Contenders (each greedy, exactly `--tokens` new tokens, ignoring EOS, steering on layers 10-19 with
the random directions of bench_engine.py / bench_llamacpp.py):
  engine-fp32 / engine-int8 / engine-int4   this ONNX Runtime engine on the float32, int8 and int4 exports
                                            (int4 carries the GGUF's own Q4_1 / Q8_0 blocks, see
                                            export/gguf_blocks.py; int8 rounds the float weights)
  engine-int4-unsteered                     the int4 graph exported with no steered layer (no steering ops):
                                            its decode rate over engine-int4's is the steering overhead
  engine-int4-stock                         the int4 graph on stock ONNX Runtime kernels only (--kernels
                                            stock: 3 kernels per Q4_1 linear instead of grains-edge's one)
  pytorch-eager                             transformers, float32, a KV-cache loop with steering hooks
  llamacpp-q4_1                             llama-cpp-python on the same Q4_1 GGUF with the control vector
                                            set by llama_set_adapter_cvec (skipped when not installed)
  llamacpp-q4_1-amx                         with --llamacpp-amx DIR: a second llama-cpp-python build, with
                                            AMX kernels, prompts fed one token at a time (see bench/README.md)
For each: time to first token and decode tokens/s after a short chat prompt and after a 512-token
prompt, peak RSS, and the roofline: bytes of weights a decoded token reads (from the export's or the
GGUF's own tensors) over the machine's measured read bandwidth gives the decode rate it cannot exceed.
Every contender runs in its own process (so RSS is its own), one process per
repetition, the contenders interleaved (A, B, C, A, B, C, …); medians are reported with the ratios
the issue asks about. Exports that are missing are built first (a minute each).

Between processes this machine's speed drifts by ±10 %, more than some of the differences measured. So a
last, paired run (`paired` in the JSON, `--paired-rounds`) loads the int4 engine with and without steering
ops, on stock kernels, and llama.cpp into one process and alternates short-prompt decodes between them,
round after round; the ratios it reports are medians of the per-round ratios.

    python bench/bench_speed.py [--repeats 3] [--tokens 64] [--out bench/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from prompts import LONG_PROMPT_TOKENS, PROMPT, filler_ids
from report import machine, publish

# engine contenders: (quantization, steered layers, kernels of the export)
ENGINES = {
    "engine-fp32": ("none", "all", "auto"),
    "engine-int8": ("int8", "all", "auto"),
    "engine-int4": ("int4", "all", "auto"),
    "engine-int4-unsteered": ("int4", "none", "auto"),  # no steering ops at all: the steering overhead
    "engine-int4-stock": ("int4", "all", "stock"),  # what grains-edge's own Q4_1 kernel gains
}
CONTENDERS = (*ENGINES, "pytorch-eager", "llamacpp-q4_1")


def export_for(quantize: str, layers: str, kernels: str = "auto") -> Path:
    """The default model's export with this quantization, steered layers and kernels, built if missing."""
    from grains_edge.export.manifest import Manifest
    from grains_edge.runtime.bootstrap import ensure_export, export_dir_for

    if layers == "all" and kernels == "auto":
        return ensure_export("default", quantize)
    quantized = export_dir_for("default", quantize)
    suffix = ("-unsteered" if layers == "none" else "") + ("" if kernels == "auto" else f"-{kernels}")
    target = quantized.with_name(quantized.name + suffix)
    if not Manifest.is_current(target):
        from grains_edge.export.onnx_export import export

        export("default", target, layers_spec=layers, quantize=quantize, kernels=kernels)
    return target


def steering_vector(layers: int, hidden: int) -> tuple[np.ndarray, int, int]:
    from bench_llamacpp import control_vector

    return control_vector(layers, hidden)


def engine_worker(quantize: str, layers: str, kernels: str, tokens: int) -> dict:
    from engine_runs import engine_run

    from grains_edge.runtime.engine import Engine

    engine = Engine(export_for(quantize, layers, kernels), device="cpu")
    vector = steering_vector(engine.num_layers, engine.hidden_size)[0] if layers != "none" else None
    prompts = {
        "short_chat": engine.chat_ids(PROMPT),
        "long_512": filler_ids(lambda text: engine.tokenizer.encode(text, add_special_tokens=False)),
    }
    engine_run(engine, prompts["short_chat"], vector, 8)  # warm-up
    return {name: engine_run(engine, ids, vector, tokens) for name, ids in prompts.items()}


def pytorch_worker(tokens: int) -> dict:
    import torch
    from bench_engine import torch_loop_run

    from grains_edge.model import sources

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = sources.load("default")
    vector, _, _ = steering_vector(model.config.num_hidden_layers, model.config.hidden_size)
    steering = torch.from_numpy(vector)[None]
    chat = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompts = {
        "short_chat": chat,
        "long_512": filler_ids(lambda text: tokenizer.encode(text, add_special_tokens=False)),
    }
    torch_loop_run(model, prompts["short_chat"], steering, 8)
    return {name: torch_loop_run(model, list(ids), steering, tokens) for name, ids in prompts.items()}


def steered_llamacpp():
    """llama.cpp on the default GGUF, on all cores, and a context with the benchmark's control vector."""
    from bench_llamacpp import LlamaRunner, default_gguf

    runner = LlamaRunner(default_gguf(), threads=os.cpu_count() or 1)
    ctx = runner.new_context()
    runner.set_control_vector(ctx, *steering_vector(runner.n_layer, runner.n_embd))
    return runner, ctx


def llamacpp_worker(tokens: int, prompt_batch: int | None = None) -> dict:
    runner, ctx = steered_llamacpp()
    prompts = {"short_chat": runner.chat_ids(PROMPT), "long_512": filler_ids(runner.tokenize)}
    runner.greedy(ctx, prompts["short_chat"], 8, prompt_batch)
    results = {}
    for name, ids in prompts.items():
        _, first, rate = runner.greedy(ctx, ids, tokens, prompt_batch)
        results[name] = (first, rate)
    return results


def paired_worker(tokens: int, rounds: int) -> dict:
    """One process, the short chat prompt, `rounds` rounds of: int4 engine with steering, the int4 graph
    without steering ops, llama.cpp with its control vector (when installed). Ratios are taken within each
    round and their median reported, so the machine's drift between processes cancels out."""
    from engine_runs import engine_run

    from grains_edge.runtime.engine import Engine

    steered = Engine(export_for("int4", "all"), device="cpu")
    plain = Engine(export_for("int4", "none"), device="cpu")
    stock = Engine(export_for("int4", "all", "stock"), device="cpu")
    vector = steering_vector(steered.num_layers, steered.hidden_size)[0]
    ids = steered.chat_ids(PROMPT)
    contenders = {
        "engine-int4": lambda: engine_run(steered, ids, vector, tokens)[1],
        "engine-int4-unsteered": lambda: engine_run(plain, ids, None, tokens)[1],
        "engine-int4-stock": lambda: engine_run(stock, ids, vector, tokens)[1],
    }
    from bench_llamacpp import llama_cpp

    if llama_cpp is not None:
        runner, ctx = steered_llamacpp()
        llama_ids = runner.chat_ids(PROMPT)
        contenders["llamacpp-q4_1"] = lambda: runner.greedy(ctx, llama_ids, tokens)[2]
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, run in contenders.items():
            time.sleep(0.2)  # let the previous contender's spinning threads go idle
            rate = run()
            if round_index:
                rates[name].append(rate)
    pairs = [
        ("engine-int4", "llamacpp-q4_1"),
        ("engine-int4-unsteered", "engine-int4"),
        ("engine-int4", "engine-int4-stock"),
    ]
    return {
        "rounds": rounds,
        "decode_tokens_per_second": {name: statistics.median(runs) for name, runs in rates.items()},
        "decode_tokens_per_second_runs": rates,
        "ratios": {
            f"{a}_vs_{b}_decode_short_chat": statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))
            for a, b in pairs
            if a in rates and b in rates
        },
    }


def worker(name: str, tokens: int, rounds: int) -> dict:
    if name == "paired":
        return paired_worker(tokens, rounds)
    if name in ENGINES:
        runs = engine_worker(*ENGINES[name], tokens)
    elif name == "pytorch-eager":
        runs = pytorch_worker(tokens)
    elif name == "llamacpp-q4_1-amx":
        runs = llamacpp_worker(tokens, prompt_batch=1)
    else:
        runs = llamacpp_worker(tokens)
    result = {
        prompt: {"time_to_first_token_ms": 1000 * first, "decode_tokens_per_second": rate}
        for prompt, (first, rate) in runs.items()
    }
    result["peak_rss_mb"] = peak_rss_mb()
    return result


LOOKUPS = ("Gather", "GatherBlockQuantized", "Q6_KGather")  # an embedding lookup reads one row of its table
ATTENTION = ("GroupQueryAttention", "CachedAttention")  # their rope tables: a row per position


def export_weight_bytes(folder: Path) -> int:
    """Bytes of weights one decoded token reads from an export: every initializer a node reads whole, so not
    an embedding lookup's table (a tied head still reads it whole), not attention's rope tables and not the
    graph's int64 shape constants."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    read = {name for node in graph.node if node.op_type not in LOOKUPS + ATTENTION for name in node.input}
    total = 0
    for tensor in graph.initializer:
        if tensor.name not in read or tensor.data_type == onnx.TensorProto.INT64:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({entry.key: entry.value for entry in tensor.external_data}["length"])
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes
    return total


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of weights one llama.cpp decode step reads from a GGUF: every tensor but the embedding table, which
    it reads whole only as a tied head (no `output.weight`)."""
    from gguf import GGUFReader

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors}
    skip = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(size for name, size in tensors.items() if name not in skip)


def roofline(contenders: list[str]) -> dict:
    """Measured read bandwidth and, per contender, weight bytes per token and the decode rate they allow."""
    from bench_llamacpp import default_gguf
    from read_bandwidth import bytes_per_second

    bandwidth = bytes_per_second()
    per_token = {}
    for name in contenders:
        if name in ENGINES:
            per_token[name] = export_weight_bytes(export_for(*ENGINES[name]))
        elif name.startswith("llamacpp"):
            per_token[name] = gguf_weight_bytes(default_gguf())
        else:
            per_token[name] = export_weight_bytes(export_for("none", "all"))
    return {
        "measured_bandwidth_gb_per_s": bandwidth / 1e9,
        "weight_mb_per_token": {name: size / 1e6 for name, size in per_token.items()},
        "bandwidth_bound_tokens_per_second": {name: bandwidth / size for name, size in per_token.items()},
    }


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(name: str, tokens: int, amx_build: str | None = None, rounds: int = 0) -> dict:
    environment = dict(os.environ)
    if name == "llamacpp-q4_1-amx":
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [amx_build, environment.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--tokens", str(tokens), "--paired-rounds", str(rounds)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(samples: list[dict]) -> dict:
    result: dict = {"peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples)}
    for prompt in ("short_chat", "long_512"):
        result[prompt] = {
            key: statistics.median(s[prompt][key] for s in samples)
            for key in ("time_to_first_token_ms", "decode_tokens_per_second")
        }
        result[prompt]["decode_tokens_per_second_runs"] = [s[prompt]["decode_tokens_per_second"] for s in samples]
    return result


def ratios(results: dict) -> dict:
    """Decode-rate ratios (above 1: the first is faster) and time-to-first-token ratios (below 1: the first
    answers sooner), for the pairs whose both sides ran."""
    pairs = [
        ("engine-int4", "engine-fp32", ("short_chat",)),
        ("engine-fp32", "pytorch-eager", ("short_chat",)),
        ("engine-int4", "llamacpp-q4_1", ("short_chat", "long_512")),
        ("engine-int4", "llamacpp-q4_1-amx", ("short_chat", "long_512")),
        ("engine-int4-unsteered", "engine-int4", ("short_chat",)),  # decode ratio - 1 = steering overhead
        ("engine-int4", "engine-int4-stock", ("short_chat", "long_512")),  # grains-edge's Q4_1 kernel
    ]
    out = {}
    for first, second, prompts in pairs:
        if first not in results or second not in results:
            continue
        for prompt in prompts:
            a, b = results[first][prompt], results[second][prompt]
            out[f"{first}_vs_{second}_decode_{prompt}"] = a["decode_tokens_per_second"] / b["decode_tokens_per_second"]
            out[f"{first}_vs_{second}_ttft_{prompt}"] = a["time_to_first_token_ms"] / b["time_to_first_token_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", choices=CONTENDERS, help="just these contenders (repeatable)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--llamacpp-amx",
        default=None,
        metavar="DIR",
        help="also run a llama-cpp-python build with AMX installed in DIR (pip install --target DIR); its "
        "prompts go one token per batch, since such builds crash on larger batches on this CPU",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=15,
        help="rounds of the in-process paired comparison (int4 steered / unsteered / stock / llama.cpp); 0 skips it",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.paired_rounds)))
        return 0

    contenders = list(args.only or CONTENDERS)
    if args.llamacpp_amx:
        contenders.append("llamacpp-q4_1-amx")
    from bench_llamacpp import SKIPPED, llama_cpp

    if "llamacpp-q4_1" in contenders and llama_cpp is None:
        contenders.remove("llamacpp-q4_1")
        print(f"{SKIPPED['skipped']}: llama.cpp skipped", file=sys.stderr)
    for name in contenders:
        if name in ENGINES:
            export_for(*ENGINES[name])
    load_start = os.getloadavg()[0]
    samples: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        for name in contenders:
            started = time.perf_counter()
            samples[name].append(run_worker(name, args.tokens, args.llamacpp_amx))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results = {name: medians(runs) for name, runs in samples.items()}
    bound = roofline(contenders)
    for name, result in results.items():
        result["fraction_of_roofline_short_chat"] = (
            result["short_chat"]["decode_tokens_per_second"] / bound["bandwidth_bound_tokens_per_second"][name]
        )
    report = {
        "decode_tokens": args.tokens,
        "long_prompt_tokens": LONG_PROMPT_TOKENS,
        "repeats": args.repeats,
        "machine": {
            **machine(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "roofline": bound,
        "results": results,
        "ratios": ratios(results),
    }
    if args.paired_rounds and "engine-int4" in contenders:
        report["paired"] = run_worker("paired", args.tokens, rounds=args.paired_rounds)
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
