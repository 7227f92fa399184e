"""Export a Hugging Face causal LM to a steered ONNX graph, then verify it against PyTorch.

The graph is built by `graph.py` straight from the weights (inputs `input_ids`, `attention_mask`,
`position_ids`, `steering` [batch, num_layers, hidden], `past_key_values.{i}.key|value`; outputs
`logits` and `present.{i}.key|value`). Verification runs the Hugging Face model with the same
steering applied by forward hooks and ONNX Runtime on the same inputs. The export directory is
written to a temporary sibling and renamed into place only after verification passes, so a failed or
interrupted export never leaves a half-written directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from grains_edge.export import graph

from grains_edge import models
from grains_edge.errors import GrainsError
from grains_edge.layers import parse_layers
from grains_edge.manifest import MANIFEST_NAME, MODEL_NAME, Manifest
from grains_edge.steering import steering_hooks

OPSET = graph.OPSET
# ORT vs PyTorch: max |Δlogit| / max(1, max |logit|) must stay below this (float32 throughout).
TOLERANCE = 1e-3


def log(message: str) -> None:
    print(f"[grains-edge] {message}", file=sys.stderr, flush=True)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", "steering", *past], ["logits", *present]


def write_graph(model, steered: list[int], path: Path) -> None:
    inputs, outputs = io_names(model.config.num_hidden_layers)
    proto = graph.build(model, steered, inputs, outputs)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def verify(model, export_dir: Path, manifest: Manifest) -> dict:
    """Compare ORT to the HF model with steering hooks: zero and non-zero steering, prefill and a cached step."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(export_dir / MODEL_NAME), providers=["CPUExecutionProvider"])
    inputs, _ = io_names(manifest.num_layers)
    generator = torch.Generator().manual_seed(1)
    batch, prompt = 2, 9
    ids = torch.randint(0, min(manifest.vocab_size, 1000), (batch, prompt + 1), generator=generator)
    with torch.no_grad():
        scale = float(model.get_input_embeddings()(ids).norm(dim=-1).mean()) * 4
    steered = torch.zeros(batch, manifest.num_layers, manifest.hidden_size)
    for layer in manifest.steered_layers:
        steered[:, layer] = torch.randn(batch, manifest.hidden_size, generator=generator)
    steered *= scale / steered.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    steered[1] *= -0.5  # a different profile on the second row
    report = {}
    for label, steering in (("zero", torch.zeros_like(steered)), ("steered", steered)):
        with torch.no_grad(), steering_hooks(model, steering, manifest.steered_layers):
            reference = model(input_ids=ids).logits.numpy()  # [batch, prompt + 1, vocab]
        empty = np.zeros((batch, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
        feeds = {
            "input_ids": ids[:, :prompt].numpy(),
            "attention_mask": np.ones((batch, prompt), np.int64),
            "position_ids": np.arange(prompt)[None].repeat(batch, 0),
            "steering": steering.numpy(),
            **{name: empty for name in inputs[4:]},
        }
        logits, *present = session.run(None, feeds)
        step = {
            "input_ids": ids[:, prompt:].numpy(),
            "attention_mask": np.ones((batch, prompt + 1), np.int64),
            "position_ids": np.full((batch, 1), prompt),
            "steering": steering.numpy(),
            **dict(zip(inputs[4:], present, strict=True)),
        }
        next_logits = session.run(["logits"], step)[0]
        ours = np.concatenate([logits, next_logits], axis=1)
        error = float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))
        report[label] = error
        if not error <= TOLERANCE:
            raise GrainsError(
                f"export verification failed: ORT and PyTorch logits differ by {error:.2e} (relative, "
                f"{label} steering) > {TOLERANCE:.0e}; fix: report this model as unsupported"
            )
    return report


def package_versions() -> dict[str, str]:
    names = ("grains-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def export(model_spec: str, out_dir: str | Path, layers_spec: str = "all") -> Manifest:
    """Load, export, verify and atomically publish `out_dir`, steering the layers named by `layers_spec`."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise GrainsError(f"{out_dir} exists and is not an export; fix: choose an empty or new --out folder")
    started = time.perf_counter()
    log(f"loading {model_spec} …")
    model, tokenizer = models.load(model_spec)
    config = model.config
    num_layers = config.num_hidden_layers
    steered = [] if layers_spec == "none" else parse_layers(layers_spec, num_layers)
    heads = config.num_attention_heads
    manifest = Manifest(
        source_model=model_spec,
        architecture=config.model_type,
        num_layers=num_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        max_context=int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048)),
        steered_layers=steered,
        input_names=io_names(num_layers)[0],
        output_names=io_names(num_layers)[1],
        opset=OPSET,
        weights_fingerprint=models.fingerprint(model),
        versions=package_versions(),
    )
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        log(f"writing the ONNX graph: {num_layers} layers, steering after {len(steered)} of them …")
        write_graph(model, steered, staging / MODEL_NAME)
        tokenizer.save_pretrained(staging)
        log("verifying ONNX Runtime against PyTorch (zero and non-zero steering, KV cache) …")
        manifest.verification = verify(model, staging, manifest)
        manifest.save(staging / MANIFEST_NAME)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    errors = ", ".join(f"{k} {v:.1e}" for k, v in manifest.verification.items())
    log(f"wrote {out_dir} in {time.perf_counter() - started:.0f} s (max relative logit error: {errors})")
    return manifest


def describe(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=2)
