"""An 8B int4 export from a Q4_K_M GGUF on this machine, measured: does it fit a 24 GiB workstation?

Steps, each cached in the work folder (`--work`, shared with bench_1b.py, whose converter it uses):
  1. model      a random-weight Llama with Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads,
                MLP 14336, vocabulary 128256, untied head: 8.03B parameters; bench_1b.DIMENSIONS_8B), seeded,
                made in bfloat16 and saved as a Hugging Face folder (16 GB)
  2. gguf       llama.cpp's convert_hf_to_gguf.py to bf16, then llama_cpp.llama_model_quantize to Q4_K_M; the
                folder and the bf16 GGUF are deleted after (`--keep` keeps them: 32 GB together)
  3. export     `grains-edge export --quantize int4` from the Q4_K_M GGUF in a process of its own: wall time,
                peak RSS and the highest RSS of each phase it logs (bench_1b.measured); the same export of
                bench_1b.py's 1B Q4_K_M GGUF, when its work folder has one, beside it
  4. decode     the export and llama.cpp on the same GGUF, steered by the same random vectors (norm 4 on the
                middle third of the layers: the speed does not depend on it), one process each per repetition,
                alternating (bench_1b.py's workers): decode tokens/s after a short chat prompt and after a
                512-token prompt, time to first token, peak RSS; then one paired process alternating them
                round after round (bench_1b.paired_worker), whose per-round ratios cancel the machine's drift
Random weights; the memory and the speed are real. Needs about 40 GB of free disk while it builds.

    python bench/bench_8b_export.py [--work DIR] [--repeats 2] [--paired-rounds 4] [--out bench/results/export_8b.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench_1b import (
    DEFAULT_WORK,
    DIMENSIONS_8B,
    MACHINE_GIB,
    available_mb,
    build_model,
    convert,
    decode_runs,
    exported,
    parameter_count,
    per_process_ratios,
    quantized,
    steering_file,
)
from report import machine, publish

KIND = "Q4_K_M"
STEERING_NORM = 4.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the model, GGUFs and export are kept")
    parser.add_argument("--keep", action="store_true", help="keep the safetensors folder and the bf16 GGUF")
    parser.add_argument("--export-again", action="store_true", help="re-run and re-measure the export")
    parser.add_argument("--repeats", type=int, default=2, help="decode runs per contender")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per prompt")
    parser.add_argument("--paired-rounds", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    size_dir = args.work / "8b"
    size_dir.mkdir(parents=True, exist_ok=True)
    gguf = size_dir / f"model-{KIND}.gguf"
    steps: dict = {}
    record = size_dir / "steps.json"
    if not gguf.is_file():
        folder = build_model(size_dir / "hf", DIMENSIONS_8B)
        steps["parameters"] = parameter_count(json.loads((folder / "config.json").read_text()))
        bf16 = convert(args.work, size_dir, steps)
        quantized(bf16, KIND, steps)
        record.write_text(json.dumps(steps, indent=1))
        if not args.keep:
            shutil.rmtree(folder)
            bf16.unlink()
    steps = json.loads(record.read_text())
    available_at_start = available_mb()
    export = exported(str(gguf), size_dir / f"export-int4-{KIND}", "int4", args.export_again)
    small = args.work / "1b" / gguf.name
    export_1b = exported(str(small), small.with_name(f"export-int4-{KIND}"), "int4", True) if small.is_file() else None
    steering_file(size_dir, DIMENSIONS_8B["num_hidden_layers"], DIMENSIONS_8B["hidden_size"], norm=STEERING_NORM)
    worker = ["--work", str(args.work), "--size", size_dir.name, "--tokens", str(args.tokens)]
    decode, paired = decode_runs(worker, size_dir, args.repeats, args.paired_rounds)
    result = {
        "machine": {**machine(), "available_mb_at_export_start": available_at_start},
        "parameters": steps["parameters"],
        "dimensions": DIMENSIONS_8B,
        "gguf": {"kind": KIND, "bytes": gguf.stat().st_size},
        "gguf_steps": {k: v for k, v in steps.items() if k != "parameters"},
        "export": export,
        "export_1b": export_1b,
        "machine_gib": MACHINE_GIB,
        "fits": "failed" not in export and export["peak_rss_mb"] / 1024 < MACHINE_GIB,
        "decode": decode,
        "decode_ratios": per_process_ratios(decode),
        "paired": paired,
    }
    if "failed" not in export:
        result["peak_rss_gib"] = export["peak_rss_mb"] / 1024
    publish(result, args.out)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
