"""A 1B-class model, exported by grains-edge and by llama.cpp's own tools, then decoded by both with steering.

Steps, each cached in the work folder (`--work`), so that a rerun skips what is done:
  1. model      a random-weight Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192; the default
                model's tokenizer, vocabulary, rope and special tokens, tied head: 1.07B parameters), seeded,
                saved as a Hugging Face folder (bf16 safetensors, as checkpoints ship); and the same recipe
                with 4 layers (0.34B), the second point of the export's scaling
  2. gguf       llama.cpp's own convert_hf_to_gguf.py from llama-cpp-python's source distribution (bf16: the
                same weights), then llama_cpp.llama_model_quantize to Q4_K_M, Q4_0 and Q5_K_M
  3. export     `grains-edge export`, float32 and `--quantize int4` from the safetensors folder and int4 from
                each GGUF, each in a process of its own: wall time, peak RSS and the highest RSS of each phase
                it logs; the same for the default model (135M); from the two sizes of one recipe, the peak
                RSS and time of an 8B export (Llama-3.1-8B's shape), projected
  4. decode     grains-edge int4 and llama.cpp, steered by the same random vectors on the middle third of the
                layers (the engine takes them as its steering input, llama.cpp as the control vector file
                that `grains_edge.steer.control_vectors` writes, set by llama_set_adapter_cvec): one process
                per contender and repetition, interleaved, then one paired process alternating them round
                after round (bench_speed.py's method): decode tokens/s after a short chat prompt and after a
                512-token prompt, time to first token of both, peak RSS, and the ratios
  5. roofline   the bytes of weights each contender's decode step reads, against the machine's streaming read
                bandwidth (read_bandwidth.py): the decode rate no engine reading those bytes can pass
Random weights make nonsense text; the speed and the memory are real. Never run two of these at once: the
float32 model alone is 4.3 GB.

    python bench/bench_1b.py [--repeats 3] [--paired-rounds 8] [--out bench/results/1b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
from prompts import LONG_PROMPT_TOKENS, LONG_TEXT, PROMPT, filler_ids
from read_bandwidth import read_bandwidth
from report import machine, publish

DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grains-edge-bench-1b"
LLAMA_CPP_PYTHON = "0.3.36"  # the installed llama-cpp-python; its sdist vendors the llama.cpp it runs
# Llama-3.2-1B's shape with the default model's 49k vocabulary
DIMENSIONS_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
}
SIZES = {"1b": DIMENSIONS_1B, "0.3b": {**DIMENSIONS_1B, "num_hidden_layers": 4}}
# Llama-3.1-8B, for the export projection
DIMENSIONS_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
MACHINE_GIB = 24  # the machine class the 8B export must fit
SEED = 0
# what the default model's config contributes: the vocabulary and its special tokens, rope, norm
INHERITED = (
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
)
# the steering vector's norm, as a fraction of the mean hidden-state norm after the layers it steers
STEERING_FRACTION = 0.5
# the GGUF types each size is quantized to and exported from with --quantize int4; float32 and int4 are also
# exported from the safetensors folder
INT4_SOURCES = {"1b": ("Q4_0", "Q4_K_M", "Q5_K_M"), "0.3b": ("Q4_0",)}
SCALED = ("fp32", "int4-safetensors", "int4-Q4_0")  # the exports measured at both sizes, projected to 8B
# contender -> (runtime, GGUF type of the file it runs or was exported from)
CONTENDERS = {
    "engine-int4-q4_k_m": ("engine", "Q4_K_M"),
    "llamacpp-q4_k_m": ("llamacpp", "Q4_K_M"),
    "engine-int4-q4_0": ("engine", "Q4_0"),
    "llamacpp-q4_0": ("llamacpp", "Q4_0"),
    "engine-int4-q5_k_m": ("engine", "Q5_K_M"),
    "llamacpp-q5_k_m": ("llamacpp", "Q5_K_M"),
}
# (grains-edge, llama.cpp): on the same file, and the pair (Q4_K_M for llama.cpp) against Q4_0
PAIRS = (
    ("engine-int4-q4_k_m", "llamacpp-q4_k_m"),
    ("engine-int4-q4_0", "llamacpp-q4_0"),
    ("engine-int4-q4_0", "llamacpp-q4_k_m"),
    ("engine-int4-q5_k_m", "llamacpp-q5_k_m"),
)


# --- 1. the model ---------------------------------------------------------------------------------------


def llama_config(default: dict, dimensions: dict) -> dict:
    """A Llama config (a dict for LlamaConfig) with `dimensions` and, for the rest, the default model's
    vocabulary, special tokens, rope and norm (from its config dict `default`)."""
    config = {key: default[key] for key in INHERITED if key in default}
    config.update(dimensions)
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", **config}


def parameter_count(config: dict) -> int:
    """Parameters of a Llama model with this config (no biases): embedding, layers, final norm, untied head."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    mlp = 3 * hidden * config["intermediate_size"]
    layer = attention + mlp + 2 * hidden  # and its two norms
    embedding = config["vocab_size"] * hidden
    head = 0 if config.get("tie_word_embeddings", True) else embedding
    return embedding + config["num_hidden_layers"] * layer + hidden + head


def default_config() -> dict:
    from transformers import AutoConfig

    from grains_edge.model import sources

    default = sources.resolve("default")
    return AutoConfig.from_pretrained(default.path, gguf_file=default.gguf_file).to_dict()


def build_model(folder: Path, dimensions: dict) -> Path:
    """The random-weight model in `folder` (config, bf16 safetensors, the default model's tokenizer), made
    once; seeded, so a rebuild holds the same weights."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grains_edge.model import sources

    default = sources.resolve("default")
    tokenizer = AutoTokenizer.from_pretrained(default.path, gguf_file=default.gguf_file)
    torch.manual_seed(SEED)
    config = LlamaConfig(**llama_config(default_config(), dimensions))
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging, max_shard_size="1GB")
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    return folder


def hidden_norms(folder: Path) -> list[float]:
    """Mean norm of the hidden state after each layer, on the filler text (cached beside the model)."""
    cache = folder.parent / "hidden_norms.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = AutoTokenizer.from_pretrained(folder)(LONG_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states[1:]  # per layer [1, seq, hidden]
    norms = [float(state[0].float().norm(dim=-1).mean()) for state in states]
    cache.write_text(json.dumps(norms))
    return norms


def steering_file(size_dir: Path, num_layers: int, hidden: int, norm: float | None = None) -> Path:
    """bench_llamacpp.control_vector's random directions on the middle third of the layers, each of norm `norm`
    or else STEERING_FRACTION of the hidden-state norm there (of the model in size_dir/hf), written as a
    llama.cpp control vector."""
    from bench_llamacpp import control_vector

    from grains_edge.steer.control_vectors import export_gguf
    from grains_edge.steer.profiles import Profile

    path = size_dir / "steering.gguf"
    if path.is_file():
        return path
    _, start, stop = control_vector(num_layers, hidden)
    if norm is None:
        norm = STEERING_FRACTION * float(np.mean(hidden_norms(size_dir / "hf")[start : stop + 1]))
    vectors, _, _ = control_vector(num_layers, hidden, norm=norm)
    metadata = {"description": f"random directions of norm {norm:.3f} (bench_1b.py)"}
    profile = Profile("bench-1b-random", vectors, list(range(start, stop + 1)), 1.0, "random", metadata)
    export_gguf(profile, path, model_hint="llama")
    return path


def steering(path: Path, num_layers: int, hidden: int) -> tuple[np.ndarray, int, int]:
    """The control vector file as both sides take it: [num_layers, hidden] and the steered layer range."""
    from grains_edge.steer.control_vectors import import_gguf

    profile = import_gguf(path, num_layers, hidden)
    return profile.vectors * profile.alpha, min(profile.layers), max(profile.layers)


# --- 2. GGUF files ---------------------------------------------------------------------------------------


def converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the llama-cpp-python
    source distribution, and sentencepiece, which it imports, in a folder of its own."""
    root = work / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = work / "sdist"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist],
        check=True,
    )
    subprocess.run([*pip, "install", "--no-deps", "--target", work / "convert-deps", "sentencepiece<0.3"], check=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        for member in archive.getmembers():
            if member.name.startswith(prefix) and member.name[len(prefix) :].startswith(wanted):
                member.name = member.name[len(prefix) :]
                archive.extract(member, root, filter="data")
    return script


def convert(work: Path, size_dir: Path, measurements: dict) -> Path:
    """The bf16 GGUF of the safetensors folder, by llama.cpp's converter (its own gguf-py first on the path)."""
    path = size_dir / "model-BF16.gguf"
    if not path.is_file():
        script = converter(work)
        partial = path.with_suffix(".partial")
        command = [sys.executable, str(script), str(size_dir / "hf"), "--outtype", "bf16", "--outfile", str(partial)]
        environment = {**os.environ, "PYTHONPATH": str(work / "convert-deps")}
        measurements["convert"] = measured(command, env=environment)
        os.replace(partial, path)
    return path


def quantize_worker(source: str, target: str, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")


def quantized(source: Path, kind: str, measurements: dict) -> Path:
    """`source` quantized to `kind` (Q4_K_M, Q4_0, Q5_K_M) by llama.cpp, in a process of its own."""
    path = source.with_name(f"model-{kind}.gguf")
    if not path.is_file():
        partial = path.with_suffix(".partial")
        command = [sys.executable, __file__, "--quantize-worker", str(source), str(partial), kind]
        measurements[f"quantize_{kind}"] = measured(command)
        os.replace(partial, path)
    return path


# --- 3. exports and their memory --------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its peak so far) of process `pid`, in MB; {} once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = (line.split() for line in status.splitlines() if line.startswith(("VmRSS:", "VmHWM:")))
    return {name.rstrip(":"): int(kib) / 1024 for name, kib, *_ in fields}


def available_mb() -> float:
    from grains_edge.model.sources import available_memory

    return available_memory() / 2**20


def measured(command: list[str], floor_mb: float = 1500, env: dict | None = None) -> dict:
    """Run `command`: wall time, its peak RSS (VmHWM, read every 0.1 s: wait4's ru_maxrss would count the
    launching process's resident set, which a child inherits until exec), and per line it logs to stderr
    (its phases) the seconds since the start and the highest RSS sampled until the next line. The run is
    killed when the machine's available memory falls below `floor_mb` (others share it)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    phases: list[dict] = [{"line": "start", "at_s": 0.0, "rss_mb": 0.0}]
    tail: list[str] = []

    def read_log() -> None:
        for line in process.stderr:
            tail[:] = [*tail[-20:], line]
            if line.startswith("[grains-edge]"):
                phases.append({"line": line.strip()[:160], "at_s": time.perf_counter() - started, "rss_mb": 0.0})

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    starved, peak = False, 0.0
    while process.poll() is None:
        now = memory_mb(process.pid)
        phases[-1]["rss_mb"] = max(phases[-1]["rss_mb"], now.get("VmRSS", 0.0))
        peak = max(peak, now.get("VmHWM", 0.0))
        if available_mb() < floor_mb:
            starved = True
            process.kill()
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    reader.join()
    if starved or process.returncode:
        reason = f"the machine fell below {floor_mb:.0f} MB available" if starved else f"exit {process.returncode}"
        raise RuntimeError(f"{' '.join(command)} failed ({reason}):\n{''.join(tail)}")
    return {"seconds": seconds, "peak_rss_mb": peak, "phases": phases}


def exported(model: str, out: Path, quantize: str, again: bool) -> dict:
    """`grains-edge export` of `model` into `out`, measured; the measurement is kept beside it (`out`.json)
    and a rerun reuses both unless `again`."""
    record = out.with_name(out.name + ".json")
    if record.is_file() and not again:
        return json.loads(record.read_text())
    grains_edge = Path(sys.executable).with_name("grains-edge")
    command = [str(grains_edge), "export", "--model", model, "--out", str(out), "--quantize", quantize]
    result: dict = {"model": model, "quantize": quantize}
    try:
        result.update(measured(command))
        result["export_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    except RuntimeError as error:  # recorded, and its contender left out: the other exports still count
        result["failed"] = str(error).splitlines()[-1]
    record.write_text(json.dumps(result, indent=1))
    return result


def fitted(points: list[tuple[int, float]], parameters: int) -> dict:
    """The line through (parameters, value) points by least squares, and its value at `parameters`."""
    x, y = np.array([p for p, _ in points], float), np.array([v for _, v in points], float)
    slope, intercept = np.polyfit(x, y, 1)
    return {
        "per_billion": float(1e9 * slope),
        "intercept": float(intercept),
        "projected": float(slope * parameters + intercept),
    }


def projection(exports: dict, sizes: dict) -> dict:
    """Peak RSS and time of an 8B export per kind, from the line through the two sizes of the recipe."""
    parameters = parameter_count(llama_config(default_config(), DIMENSIONS_8B))
    result: dict = {"parameters": parameters, "dimensions": DIMENSIONS_8B, "machine_gib": MACHINE_GIB}
    for key in SCALED:
        rss = fitted([(sizes[size], exports[size][key]["peak_rss_mb"]) for size in sizes], parameters)
        seconds = fitted([(sizes[size], exports[size][key]["seconds"]) for size in sizes], parameters)
        result[key] = {
            "peak_rss_mb_per_billion_parameters": rss["per_billion"],
            "peak_rss_mb_intercept": rss["intercept"],
            "projected_peak_rss_gib": rss["projected"] / 1024,
            "projected_minutes": seconds["projected"] / 60,
            "fits": rss["projected"] / 1024 < MACHINE_GIB,
        }
    return result


# --- 4. decoding, both sides steered --------------------------------------------------------------------


def engine_worker(export: Path, steering_path: Path, tokens: int) -> dict:
    from engine_runs import engine_run

    from grains_edge.runtime.engine import Engine

    engine = Engine(export, device="cpu")
    vector, _, _ = steering(steering_path, engine.num_layers, engine.hidden_size)
    prompts = {
        "short_chat": engine.chat_ids(PROMPT),
        "long_512": filler_ids(lambda text: engine.tokenizer.encode(text, add_special_tokens=False)),
    }
    engine_run(engine, prompts["short_chat"], vector, 8)  # warm-up
    return {name: engine_run(engine, ids, vector, tokens) for name, ids in prompts.items()}


def steered_llamacpp(gguf: Path, steering_path: Path, tokens: int):
    """llama.cpp on all cores with a context that takes the 512-token prompt in one batch, the control
    vector set on it."""
    from bench_llamacpp import LlamaRunner

    runner = LlamaRunner(gguf, threads=os.cpu_count() or 1, n_ctx=LONG_PROMPT_TOKENS + tokens + 64)
    ctx = runner.new_context()
    runner.set_control_vector(ctx, *steering(steering_path, runner.n_layer, runner.n_embd))
    return runner, ctx


def llamacpp_worker(gguf: Path, steering_path: Path, tokens: int) -> dict:
    runner, ctx = steered_llamacpp(gguf, steering_path, tokens)
    prompts = {"short_chat": runner.chat_ids(PROMPT), "long_512": filler_ids(runner.tokenize)}
    runner.greedy(ctx, prompts["short_chat"], 8)  # warm-up
    return {name: runner.greedy(ctx, ids, tokens)[1:] for name, ids in prompts.items()}


def available(size_dir: Path) -> list[str]:
    """The contenders whose file is there: an export that was written (and verified), a GGUF."""
    from grains_edge.export.manifest import MANIFEST_NAME

    files = {"engine": f"export-int4-{{}}/{MANIFEST_NAME}", "llamacpp": "model-{}.gguf"}
    return [name for name, (runtime, kind) in CONTENDERS.items() if (size_dir / files[runtime].format(kind)).is_file()]


def pairs(names: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in PAIRS if a in names and b in names]


def contender_worker(name: str, size_dir: Path, tokens: int) -> dict:
    from bench_speed import peak_rss_mb

    runtime, kind = CONTENDERS[name]
    steering_path = size_dir / "steering.gguf"
    if runtime == "engine":
        runs = engine_worker(size_dir / f"export-int4-{kind}", steering_path, tokens)
    else:
        runs = llamacpp_worker(size_dir / f"model-{kind}.gguf", steering_path, tokens)
    result = {
        prompt: {"time_to_first_token_ms": 1000 * first, "decode_tokens_per_second": rate}
        for prompt, (first, rate) in runs.items()
    }
    return {**result, "peak_rss_mb": peak_rss_mb()}


def paired_worker(size_dir: Path, tokens: int, rounds: int) -> dict:
    """One process holding every contender; each round decodes the short chat prompt and takes the first
    token of the 512-token prompt with each, in turn. Ratios are per round, then their median, so the
    machine's drift between processes and over the run cancels out."""
    from engine_runs import engine_run

    from grains_edge.runtime.engine import Engine

    steering_path = size_dir / "steering.gguf"
    runs: dict[str, tuple] = {}
    for name in available(size_dir):
        runtime, kind = CONTENDERS[name]
        if runtime == "engine":
            engine = Engine(size_dir / f"export-int4-{kind}", device="cpu")
            vector, _, _ = steering(steering_path, engine.num_layers, engine.hidden_size)
            short = engine.chat_ids(PROMPT)
            long = filler_ids(lambda text, e=engine: e.tokenizer.encode(text, add_special_tokens=False))
            runs[name] = (
                lambda e=engine, v=vector, ids=short: engine_run(e, ids, v, tokens)[1],
                lambda e=engine, v=vector, ids=long: engine_run(e, ids, v, 2)[0],
            )
        else:
            runner, ctx = steered_llamacpp(size_dir / f"model-{kind}.gguf", steering_path, tokens)
            short, long = runner.chat_ids(PROMPT), filler_ids(runner.tokenize)
            runs[name] = (
                lambda r=runner, c=ctx, ids=short: r.greedy(c, ids, tokens)[2],
                lambda r=runner, c=ctx, ids=long: r.greedy(c, ids, 2)[1],
            )
    rates: dict[str, list[float]] = {name: [] for name in runs}
    firsts: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, (decode, first_token) in runs.items():
            time.sleep(0.2)  # let the previous contender's spinning threads go idle
            rate, first = decode(), first_token()
            if round_index:
                rates[name].append(rate)
                firsts[name].append(1000 * first)
    return {
        "rounds": rounds,
        "decode_tokens_per_second_short_chat": {name: statistics.median(r) for name, r in rates.items()},
        "time_to_first_token_ms_long_512": {name: statistics.median(f) for name, f in firsts.items()},
        "runs": {"decode_tokens_per_second_short_chat": rates, "time_to_first_token_ms_long_512": firsts},
        "ratios": {
            **{f"{a}_vs_{b}_decode_short_chat": paired_ratio(rates[a], rates[b]) for a, b in pairs(list(runs))},
            **{f"{a}_vs_{b}_ttft_long_512": paired_ratio(firsts[a], firsts[b]) for a, b in pairs(list(runs))},
        },
    }


def paired_ratio(first: list[float], second: list[float]) -> float:
    """The median of the per-round ratios first / second."""
    return statistics.median(x / y for x, y in zip(first, second, strict=True))


def run_worker(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{arguments} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_runs(worker: list[str], size_dir: Path, repeats: int, rounds: int) -> tuple[dict, dict]:
    """Every contender in `size_dir` decoding in a process of its own, `repeats` times, interleaved (their
    medians), then one paired process of `rounds` rounds; `worker`: the arguments every worker process takes."""
    from bench_speed import medians

    samples: dict[str, list[dict]] = {name: [] for name in available(size_dir)}
    for _ in range(repeats):
        for name in samples:
            samples[name].append(run_worker([*worker, "--worker", name]))
    paired = run_worker([*worker, "--worker", "paired", "--paired-rounds", str(rounds)])
    return {name: medians(runs) for name, runs in samples.items()}, paired


def per_process_ratios(results: dict) -> dict:
    """Decode-rate ratios (above 1: grains-edge is faster) and first-token-time ratios (below 1: it answers
    sooner) of the per-process medians."""
    out = {}
    for a, b in pairs(list(results)):
        for prompt in ("short_chat", "long_512"):
            first, second = results[a][prompt], results[b][prompt]
            rate = first["decode_tokens_per_second"] / second["decode_tokens_per_second"]
            out[f"{a}_vs_{b}_decode_{prompt}"] = rate
            out[f"{a}_vs_{b}_ttft_{prompt}"] = first["time_to_first_token_ms"] / second["time_to_first_token_ms"]
    return out


# --- the roofline: bytes each decode step reads, against the machine's read bandwidth ---------------------


def roofline(size_dir: Path, paired: dict, bandwidth: dict) -> dict:
    """Per contender: bytes per decode step, the rate it reads them at (paired median decode rate x bytes),
    that as a share of the machine's read bandwidth, and the decode rate reading at that bandwidth would give."""
    from bench_speed import export_weight_bytes, gguf_weight_bytes

    out: dict = {"read_bandwidth": bandwidth}
    peak = bandwidth.get("gb_per_s")
    for name, rate in paired["decode_tokens_per_second_short_chat"].items():
        runtime, kind = CONTENDERS[name]
        step = (
            export_weight_bytes(size_dir / f"export-int4-{kind}")
            if runtime == "engine"
            else gguf_weight_bytes(size_dir / f"model-{kind}.gguf")
        )
        reads = step * rate / 1e9
        out[name] = {"bytes_per_step": step, "gb_per_s": reads}
        if peak:
            out[name].update(of_bandwidth=reads / peak, ceiling_tokens_per_second=peak * 1e9 / step)
    return out


# --- the run ----------------------------------------------------------------------------------------------


def prepare(work: Path, again: bool) -> tuple[dict, dict, dict]:
    """Every model, GGUF and export, built where missing: (models, the measured exports, the GGUF steps)."""
    models, exports, gguf_steps = {}, {}, {}
    for size, dimensions in SIZES.items():
        size_dir = work / size
        size_dir.mkdir(parents=True, exist_ok=True)
        folder = build_model(size_dir / "hf", dimensions)
        config = json.loads((folder / "config.json").read_text())
        models[size] = {"parameters": parameter_count(config), "dimensions": dimensions}
        steps: dict = {}
        files = {"BF16": convert(work, size_dir, steps)}
        exports[size] = {
            "fp32": exported(str(folder), size_dir / "export-fp32", "none", again),
            "int4-safetensors": exported(str(folder), size_dir / "export-int4-safetensors", "int4", again),
        }
        for kind in INT4_SOURCES[size]:
            files[kind] = quantized(files["BF16"], kind, steps)
            exports[size][f"int4-{kind}"] = exported(str(files[kind]), size_dir / f"export-int4-{kind}", "int4", again)
        models[size]["gguf_bytes"] = {kind: path.stat().st_size for kind, path in files.items()}
        gguf_steps[size] = steps
        steering_file(size_dir, config["num_hidden_layers"], config["hidden_size"])
    default_dir = work / "default"
    default_dir.mkdir(exist_ok=True)
    exports["default"] = {
        "fp32": exported("default", default_dir / "export-fp32", "none", again),
        "int4-Q4_1": exported("default", default_dir / "export-int4-Q4_1", "int4", again),
    }
    return models, exports, gguf_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where models, GGUFs and exports are kept")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paired-rounds", type=int, default=8)
    parser.add_argument("--export-again", action="store_true", help="re-run and re-measure every export")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--size", default="1b", help=argparse.SUPPRESS)  # the size folder a worker runs in
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quantize-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_dir = args.work / args.size
    if args.quantize_worker:
        quantize_worker(*args.quantize_worker)
        return 0
    if args.worker == "paired":
        print(json.dumps(paired_worker(size_dir, args.tokens, args.paired_rounds)))
        return 0
    if args.worker:
        print(json.dumps(contender_worker(args.worker, size_dir, args.tokens)))
        return 0

    load_at_start = os.getloadavg()[0]
    models, exports, gguf_steps = prepare(args.work, args.export_again)
    worker = ["--work", str(args.work), "--tokens", str(args.tokens)]
    per_process, paired = decode_runs(worker, size_dir, args.repeats, args.paired_rounds)
    bandwidth = read_bandwidth(os.cpu_count() or 1)
    sizes = {size: models[size]["parameters"] for size in SIZES}
    layers, hidden = DIMENSIONS_1B["num_hidden_layers"], DIMENSIONS_1B["hidden_size"]
    import llama_cpp

    result = {
        "models": models,
        "machine": {**machine(), "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]}},
        "llama_cpp": {
            "version": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        },
        "gguf_steps": gguf_steps,
        "exports": exports,
        "export_projection_8b": projection(exports, sizes),
        "steering": {
            "file": "steering.gguf, grains_edge.steer.control_vectors.export_gguf (a random profile, alpha 1)",
            "layers": list(steering(size_dir / "steering.gguf", layers, hidden)[1:]),
            "norm": f"{STEERING_FRACTION} x the mean hidden-state norm after the steered layers",
        },
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "per_process": per_process,
        "per_process_ratios": per_process_ratios(per_process),
        "paired": paired,
        "roofline": roofline(size_dir, paired, bandwidth),
    }
    publish(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
