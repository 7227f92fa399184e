"""int4 from float weights: Dolly perplexity and TruthfulQA MC1 of a model's float32 export against its int4
exports by each quantizer of export/quantize.py, one run, JSON.

The model is loaded as grains-edge loads it (a GGUF is dequantized to float32) and saved as a safetensors
folder: the float source that `export --quantize int4` quantizes. Variants (--variants):
  fp32                        the float32 export
  ort-rtn-symmetric-all       int4 from float before: ONNX Runtime's MatMulNBitsQuantizer (round-to-nearest,
                              block 32, symmetric, accuracy level 4) on every MatMul, the LM head too
  QUANTIZER                   a quantize.LINEAR_QUANTIZERS entry on every linear, the LM head in 8 bits
                              (quantize.HEAD); q4_1-search is the export's choice
  q4_1-search-4bit-head       the choice on the LM head too
For each: the relative RMS error of the weights as the graph holds them (the linears, the head), the
export's own check against PyTorch (max relative logit error, argmax agreement), its logits against the fp32
export's on the first --texts Dolly texts (mean KL, same argmax), then `grains-edge eval ppl` and
`eval truthfulqa` on the export (--split, --ppl-limit, --mc-limit), and the changes against fp32. Exports,
weight errors and eval results are kept in --work, so a second run resumes.

    python bench/bench_quant.py --model default --split all --ppl-limit 179 --mc-limit 100 \
        --out bench/results/quant/float-int4-default.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from report import machine, publish

ROOT = Path(__file__).resolve().parents[1]
DATA = {"ppl": "grains_edge/data/dolly/dolly_dev.jsonl", "truthfulqa": "grains_edge/data/truthfulqa_mc_train.json"}
OLD = "ort-rtn-symmetric-all"
FOUR_BIT_HEAD = "q4_1-search-4bit-head"


def float_folder(model_spec: str, folder: Path) -> Path:
    """The model's float32 weights (a GGUF dequantized, as grains-edge loads it) and tokenizer, saved once."""
    from grains_edge.model import sources

    if not (folder / "config.json").is_file():
        model, tokenizer = sources.load(model_spec)
        model.hf_quantizer = None  # transformers refuses to save what it loaded from a GGUF; the weights are float
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def graph_weights(folder: Path) -> dict[str, np.ndarray]:
    """The float MatMul weights of the model's int4 graph by linear name, [N, K] (quantize.graph_weights)."""
    from grains_edge.export import graph, quantize
    from grains_edge.model import sources

    model, _ = sources.load(str(folder))
    proto = graph.build(model, graph.graph_spec(model), [], separate_head=True)
    return {name: np.ascontiguousarray(weight) for name, weight in quantize.graph_weights(proto)}


def variant_blocks(variant: str, weights: dict[str, np.ndarray]) -> dict:
    """Blocks by linear name as `variant` quantizes them; {} for the old path (none: ONNX Runtime quantizes)."""
    from grains_edge.export import quantize

    if variant == OLD:
        return {}
    linear = quantize.LINEAR_QUANTIZERS["q4_1-search" if variant == FOUR_BIT_HEAD else variant]
    head = linear if variant == FOUR_BIT_HEAD else quantize.HEAD
    return {name: (head if name == "lm_head" else linear)(weight) for name, weight in weights.items()}


def graph_weight(blocks) -> np.ndarray:
    """[N, K] float64, the weight the graph computes with: Q4_1 kernel fields (float16 d, m) for offsets."""
    from grains_edge.export import gguf_blocks

    if blocks.offsets is None:
        return blocks.dequantized().astype(np.float64)
    rows, cols = blocks.shape
    _, d, m = gguf_blocks.q4_1_fields(blocks)
    levels = blocks.q.reshape(rows, cols // 32, 32).astype(np.float64)
    return (levels * d.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]).reshape(rows, cols)


def weight_errors(variant: str, weights: dict[str, np.ndarray], blocks: dict) -> dict[str, float]:
    """Relative RMS error ||W' - W|| / ||W|| over the linears and over the LM head."""
    from grains_edge.export import quantize

    if variant == OLD:  # ONNX Runtime's own rounding, read back as its kernel computes it (tests/test_quantize.py)
        blocks = {name: quantize.ort_rtn(weight, symmetric=True) for name, weight in weights.items()}
    sums = {"linears": [0.0, 0.0], "lm_head": [0.0, 0.0]}
    for name, weight in weights.items():
        error = graph_weight(blocks[name]) - weight
        part = sums["lm_head" if name == "lm_head" else "linears"]
        part[0] += float((error * error).sum())
        part[1] += float((weight.astype(np.float64) ** 2).sum())
    return {part: (err / total) ** 0.5 for part, (err, total) in sums.items()}


def export_variant(folder: Path, out: Path, variant: str, blocks: dict) -> dict:
    """Export `folder` as `variant` into `out` (kept when it exists); the manifest's check and weights line."""
    from grains_edge.export import quantize
    from grains_edge.export.manifest import Manifest
    from grains_edge.export.onnx_export import export

    if not Manifest.is_current(out):
        if variant == "fp32":
            export(str(folder), out)
        else:
            name = "q4_1-search" if variant in (OLD, FOUR_BIT_HEAD) else variant
            with (
                mock.patch.object(quantize, "int4_block", lambda linear, weight: blocks.get(linear)),
                mock.patch.object(quantize, "LINEAR", name),
            ):
                export(str(folder), out, quantize="int4")
    manifest = Manifest.load(out)
    check = manifest.verification
    return {
        "weights": manifest.weights,
        "kernels": manifest.kernels,
        "max_relative_logit_error": check["zero"],
        "argmax_agreement": check["zero_argmax_agreement"],
    }


def session(export_dir: Path):
    import onnxruntime as ort

    from grains_edge import kernels
    from grains_edge.export.manifest import Manifest

    manifest = Manifest.load(export_dir)
    options = ort.SessionOptions()
    if manifest.kernels == "fused":
        kernels.register(options)
    return ort.InferenceSession(str(export_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]), manifest


def dolly_texts(export_dir: Path, count: int, length: int) -> list[list[int]]:
    """The first `count` Dolly instructions with their responses, as token ids of the export's tokenizer, cut
    to `length` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    lines = (ROOT / DATA["ppl"]).read_text().splitlines()[:count]
    items = [json.loads(line) for line in lines]
    return [tokenizer.encode(f"{item['instruction']}\n\n{item['response']}").ids[:length] for item in items]


def logit_agreement(reference: Path, export_dir: Path, texts: list[list[int]]) -> dict[str, float]:
    """Against the fp32 export, unsteered, every position of `texts` (a prompt, then one cached step): mean
    KL(fp32 || export) in nats and the share of positions with the same argmax token."""
    import torch

    from grains_edge.export.onnx_export import run_graph

    runs = [session(reference), session(export_dir)]
    kl, same, positions = 0.0, 0, 0
    for ids in texts:
        tokens = torch.tensor([ids])
        steering = torch.zeros(1, runs[0][1].num_layers, runs[0][1].hidden_size)
        ours, theirs = (run_graph(run, manifest, tokens, steering)[0].astype(np.float64) for run, manifest in runs)
        log_p = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)  # [seq, vocab], fp32's
        log_q = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(ids)
    return {"mean_kl_nats": kl / positions, "same_argmax": same / positions, "positions": positions}


def evaluate(export_dir: Path, task: str, split: str, limit: int | None, cache: Path) -> dict:
    """`grains-edge eval TASK` on the export, unsteered (its JSON, kept in `cache`)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    command = [str(Path(sys.executable).parent / "grains-edge"), "eval", task, "--data", DATA[task]]
    command += ["--model", str(export_dir), "--split", split] + (["--limit", str(limit)] if limit else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(result.stdout)
    report["seconds"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # CPU time
    cache.write_text(json.dumps(report, indent=2))
    return report


def changes(rows: dict[str, dict]) -> None:
    """Adds each quantized variant's change against fp32: perplexity in %, MC1 and MC2 in points."""
    base = rows.get("fp32")
    for name, row in rows.items():
        if base is None or name == "fp32":
            continue
        if "perplexity" in row and "perplexity" in base:
            row["perplexity_change_percent"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        for score in ("mc1", "mc2"):
            if score in row and score in base:
                row[f"{score}_change_points"] = 100 * (row[score] - base[score])


def main() -> int:
    from grains_edge.export import quantize
    from grains_edge.export.manifest import Manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model spec (default, a folder, a .gguf)")
    parser.add_argument("--variants", default=",".join(["fp32", OLD, *quantize.LINEAR_QUANTIZERS, FOUR_BIT_HEAD]))
    parser.add_argument("--split", default="all")
    parser.add_argument("--ppl-limit", type=int, default=None, help="at most N Dolly responses (0: skip)")
    parser.add_argument("--mc-limit", type=int, default=None, help="at most N TruthfulQA questions (0: skip)")
    parser.add_argument("--mc-variants", default=None, help="run TruthfulQA on these variants only")
    parser.add_argument("--texts", type=int, default=16, help="Dolly texts for the logits against fp32 (0: skip)")
    parser.add_argument("--text-tokens", type=int, default=128, help="tokens of each of those texts")
    parser.add_argument("--work", default="/tmp/grains-edge-bench-quant", help="float folder, exports, eval JSON")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    variants = args.variants.split(",")
    mc_variants = args.mc_variants.split(",") if args.mc_variants else variants
    work = Path(args.work) / Path(args.model).stem
    folder = float_folder(args.model, work / "float")
    weights = graph_weights(folder)
    load_before = machine()
    rows: dict[str, dict] = {}
    texts: list[list[int]] = []
    for variant in variants:
        row: dict = {}
        cached = work / f"{variant}-weights.json"
        if variant == "fp32" or (cached.is_file() and Manifest.is_current(work / variant)):
            blocks = {}
            row.update(json.loads(cached.read_text()) if cached.is_file() else {})
        else:
            blocks = variant_blocks(variant, weights)
            row["weight_error"] = weight_errors(variant, weights, blocks)
            cached.write_text(json.dumps(row))
        row.update(export_variant(folder, work / variant, variant, blocks))
        del blocks
        agreement = work / f"{variant}-logits-{args.texts}x{args.text_tokens}.json"
        if variant != "fp32" and args.texts and not agreement.is_file():
            texts = texts or dolly_texts(work / variant, args.texts, args.text_tokens)
            agreement.write_text(json.dumps(logit_agreement(work / "fp32", work / variant, texts)))
        if agreement.is_file():
            row["logits_against_fp32"] = json.loads(agreement.read_text())
        tasks = [("ppl", args.ppl_limit), ("truthfulqa", args.mc_limit if variant in mc_variants else 0)]
        for task, limit in tasks:
            if limit == 0:
                continue
            report = evaluate(work / variant, task, args.split, limit, work / f"{variant}-{task}.json")
            keys = ("perplexity", "items") if task == "ppl" else ("mc1", "mc1_ci95", "mc2", "questions")
            row.update({key: report[key] for key in keys})
            row[f"{task}_cpu_seconds"] = report["seconds"]
        rows[variant] = row
        print(f"{variant}: {json.dumps(row)}", file=sys.stderr, flush=True)
    changes(rows)
    result = {
        "model": args.model,
        "float_weights": "as grains-edge loads the model: a GGUF dequantized to float32 by transformers",
        "split": args.split,
        "ppl_limit": args.ppl_limit,
        "mc_limit": args.mc_limit,
        "texts": {"count": args.texts, "tokens": args.text_tokens},
        "chosen": quantize.LINEAR,
        "variants": rows,
        "machine": load_before,
        "load_average_1min_end": machine()["load_average_1min"],
    }
    publish(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
