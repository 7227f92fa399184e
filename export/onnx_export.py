"""Export a Hugging Face causal LM to a steered ONNX graph, then verify it against PyTorch.

The graph is built by `graph.py` straight from the weights (inputs `input_ids`, `attention_mask`,
`position_ids`, `steering` [batch, num_layers, hidden], `past_key_values.{i}.key|value`; outputs
`logits` and `present.{i}.key|value`). Verification runs the Hugging Face model with the same
steering applied by forward hooks and ONNX Runtime on the same inputs. The export directory is
written to a staging sibling and renamed into place only after verification passes, so a failed or
interrupted export never leaves a half-written directory behind; it replaces only a folder grains-edge
provably made (`export/ownership.py`).
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch

from grains_edge import kernels as kernel_library
from grains_edge.devices import CUDA, choose_providers
from grains_edge.errors import GrainsError
from grains_edge.export import gguf_blocks, graph, graph_io, ownership
from grains_edge.export import quantize as quantize_float
from grains_edge.export.manifest import MANIFEST_NAME, MODEL_NAME, Manifest
from grains_edge.layers import parse_layers
from grains_edge.model import sources
from grains_edge.model.hooks import steering_hooks
from grains_edge.options import KERNEL_CHOICES, QUANTIZATIONS

OPSET = graph.OPSET
# ORT vs PyTorch: max |Δlogit| / max(1, max |logit|) must stay below this (float32 throughout).
TOLERANCE = 1e-3


def log(message: str) -> None:
    print(f"[grains-edge] {message}", file=sys.stderr, flush=True)


# Quantized graphs are checked against the float PyTorch model with these looser bounds.
QUANTIZED_TOLERANCE = {"int8": 0.15, "int4": 2.0}
# The steering effect (steered minus unsteered logits) must correlate with PyTorch's at least this much;
# a mis-wired steering input gives a correlation near zero.
MIN_EFFECT_CORRELATION = {"none": 0.99, "int8": 0.9, "int4": 0.5}


def source_blocks(model_spec: str, spec: graph.GraphSpec, quantize: str) -> gguf_blocks.GgufBlocks:
    """The weights a GGUF source already holds in MatMulNBits-compatible blocks, taken as they are:
    all of them (4- and 8-bit) for int4, the 8-bit ones for int8; none for other sources."""
    source = sources.resolve(model_spec)
    if quantize == "none" or source.gguf_file is None or spec.family not in gguf_blocks.PERMUTED_QK:
        return gguf_blocks.GgufBlocks({})
    path = Path(source.path) / source.gguf_file
    found = gguf_blocks.model_blocks(path, spec.family, spec.num_layers, spec.heads, spec.kv_heads)
    return found.with_bits({"int4": (4, 8), "int8": (8,)}[quantize])


def use_custom_kernels(choice: str, kinds: set[str], quantize: str = "none") -> bool:
    """Whether Q4_1 and K-quant linears (a GGUF's blocks of these `kinds`; int4's from float weights) go to
    grains-edge's own kernels: `choice` auto (when they can be built here, and not for CUDA), fused (must be) or
    stock (never)."""
    if choice not in KERNEL_CHOICES:
        raise GrainsError(f"unknown kernels '{choice}'; fix: use one of {', '.join(KERNEL_CHOICES)}")
    kernel_blocks = bool(kinds & gguf_blocks.KERNEL_KINDS)
    if choice == "stock" or not (quantize == "int4" or kernel_blocks):
        return False
    import onnxruntime as ort

    # on the CUDA provider these CPU-only kernels would run on the CPU, with copies around each one
    if choice == "auto" and choose_providers("auto", ort.get_available_providers())[0] == CUDA:
        log(
            "Q4_1 and K-quant linears on stock ONNX Runtime kernels: onnxruntime-gpu is installed, so this "
            "export is for CUDA, and grains-edge's own kernels run on the CPU only; --kernels fused for a CPU export"
        )
        return False
    reason = kernel_library.unavailable_reason()
    if reason and choice == "fused":
        raise GrainsError(reason)
    if reason:
        log(f"Q4_1 and K-quant linears on stock ONNX Runtime kernels: {reason}")
    return reason is None


def write_graph(
    model,
    spec: graph.GraphSpec,
    steered: list[int],
    path: Path,
    quantize: str = "none",
    blocks: gguf_blocks.GgufBlocks | None = None,
    custom_kernels: bool = False,
) -> str:
    """Build the graph and return how its MatMul weights are stored. For int8/int4, `blocks` (a GGUF's
    own quantized weights) are used as they are (Q4_1 ones in grains-edge's own kernel when `custom_kernels`).
    int4 quantizes every other MatMul weight from float with `quantize.int4_block` as the graph is built
    (Q4_1 blocks by a min/scale search, the LM head in 8 bits); int8, and any weight not in blocks of 32,
    with ONNX Runtime's block-wise MatMulNBits (round-to-nearest, block 32, symmetric). The embedding
    lookup, norms, attention, the steering input and its renormalization stay float32."""
    from_float: list[str] = []  # the kind of each linear quantized from float
    carried: list[tuple[tuple[str, ...], str, float]] = []  # how each of the GGUF's blocks went into the graph

    def taken(blocks: gguf_blocks.Blocks) -> None:
        carried.append((blocks.kinds, *gguf_blocks.how_carried(blocks, custom_kernels)))

    def quantizer(name: str, weight: np.ndarray) -> gguf_blocks.Blocks | None:
        made = quantize_float.int4_block(name, weight)
        if made is not None:
            from_float.append(quantize_float.kind(made))
        return made

    # weights go to disk as they are made (int8's quantizer reads them from the graph in memory instead), so
    # the model's own copy is the only full one in memory
    data = path.with_name(path.name + ".data")
    streamed = quantize != "int8"
    proto = graph.build(
        model,
        spec,
        steered,
        separate_head=quantize != "none",
        blocks=blocks,
        custom_kernels=custom_kernels,
        weights_file=data if streamed else None,
        quantizer=quantizer if quantize == "int4" else None,
        taken=taken,
    )
    rounded = [n for n in proto.graph.node if n.op_type == "MatMul"]
    if quantize != "none" and rounded:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        if streamed:  # int4 weights whose K is not a multiple of 32: ONNX Runtime's quantizer reads them
            onnx.load_external_data_for_model(proto, str(path.parent))
            data.unlink()

        bits = {"int8": 8, "int4": 4}[quantize]
        # accuracy level 4: int8 activations inside the kernel, the fast path on x86 (fp32 compute is 20x slower)
        quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        proto = quantizer.model.model
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    if quantize == "none":
        return "float32"
    parts = [gguf_blocks.summary(carried)] if carried else []
    if from_float:
        parts.append(quantize_float.summary(from_float))
    if rounded:
        parts.append(f"{len(rounded)} rounded to {quantize}")
    return "; ".join(parts)


def run_graph(session, manifest: Manifest, ids: torch.Tensor, steering: torch.Tensor) -> np.ndarray:
    """Logits [batch, seq, vocab]: all but the last token as a prompt, then the last through the KV cache."""
    past = graph_io.past_names(manifest.num_layers)
    batch, seq = ids.shape
    empty = np.zeros((batch, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
    prompt = {
        graph_io.INPUT_IDS: ids[:, :-1].numpy(),
        graph_io.ATTENTION_MASK: np.ones((batch, seq - 1), np.int64),
        graph_io.POSITION_IDS: np.arange(seq - 1)[None].repeat(batch, 0),
        graph_io.STEERING: steering.numpy(),
        graph_io.LOGITS_TO_KEEP: graph_io.ALL_POSITIONS,
        **dict.fromkeys(past, empty),
    }
    logits, *present = session.run(None, prompt)
    step = {
        graph_io.INPUT_IDS: ids[:, -1:].numpy(),
        graph_io.ATTENTION_MASK: np.ones((batch, seq), np.int64),
        graph_io.POSITION_IDS: np.full((batch, 1), seq - 1),
        graph_io.STEERING: steering.numpy(),
        graph_io.LOGITS_TO_KEEP: graph_io.ALL_POSITIONS,
        **dict(zip(past, present, strict=True)),
    }
    return np.concatenate([logits, session.run([graph_io.LOGITS], step)[0]], axis=1)


@dataclass
class Reference:
    """PyTorch's side of the verification: the tokens, the steerings and the logits for each steering."""

    ids: torch.Tensor  # [2, 10]
    steerings: dict[str, torch.Tensor]  # "zero" | "steered" -> [2, num_layers, hidden]
    logits: dict[str, np.ndarray]  # the same labels -> [2, 10, vocab]


def reference(model, manifest: Manifest) -> Reference:
    """The HF model's logits (steering by hooks) on random tokens, with zero and with non-zero steering (a
    different profile per row)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(manifest.vocab_size, 1000), (2, 10), generator=generator)
    with torch.no_grad():
        scale = float(model.get_input_embeddings()(ids).norm(dim=-1).mean()) * 4
    steered = torch.zeros(2, manifest.num_layers, manifest.hidden_size)
    for layer in manifest.steered_layers:
        steered[:, layer] = torch.randn(2, manifest.hidden_size, generator=generator)
    steered *= scale / steered.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    steered[1] *= -0.5  # a different profile on the second row
    steerings = {"zero": torch.zeros_like(steered), "steered": steered}
    logits = {}
    for label, steering in steerings.items():
        with torch.no_grad(), steering_hooks(model, steering, manifest.steered_layers):
            logits[label] = model(input_ids=ids).logits.float().numpy()  # [batch, seq, vocab]
    return Reference(ids, steerings, logits)


def verify(expected: Reference, export_dir: Path, manifest: Manifest) -> dict:
    """Run ORT on the reference's tokens and steerings, prompt plus one cached step. Float graphs must match
    the HF model's logits within TOLERANCE; quantized graphs within QUANTIZED_TOLERANCE; and the steering
    effect (steered minus unsteered logits) must correlate with PyTorch's (MIN_EFFECT_CORRELATION), which
    catches any wiring error of the steering."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if manifest.kernels == "fused":
        kernel_library.register(options)
    session = ort.InferenceSession(str(export_dir / MODEL_NAME), options, providers=["CPUExecutionProvider"])
    ours, theirs, report = {}, expected.logits, {}
    tolerance = QUANTIZED_TOLERANCE.get(manifest.quantization, TOLERANCE)
    for label, steering in expected.steerings.items():
        ours[label] = run_graph(session, manifest, expected.ids, steering)
        error = float(np.abs(ours[label] - theirs[label]).max() / max(1.0, np.abs(theirs[label]).max()))
        report[label] = error
        report[f"{label}_argmax_agreement"] = float((ours[label].argmax(-1) == theirs[label].argmax(-1)).mean())
        if not error <= tolerance:
            raise GrainsError(
                f"export verification failed: ORT and PyTorch logits differ by {error:.2e} (relative, "
                f"{label} steering) > {tolerance:.0e}; fix: report this model as unsupported"
            )
    if manifest.steered_layers:
        effect = np.corrcoef((ours["steered"] - ours["zero"]).ravel(), (theirs["steered"] - theirs["zero"]).ravel())
        report["steering_effect_correlation"] = float(effect[0, 1])
        if not report["steering_effect_correlation"] >= MIN_EFFECT_CORRELATION[manifest.quantization]:
            raise GrainsError(
                f"export verification failed: the graph's steering effect correlates with PyTorch's at only "
                f"{effect[0, 1]:.2f}; fix: report this model as unsupported"
            )
    return report


def package_versions() -> dict[str, str]:
    names = ("grains-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def export(
    model_spec: str, out_dir: str | Path, layers_spec: str = "all", quantize: str = "none", kernels: str = "auto"
) -> Manifest:
    """Load, export, verify and atomically publish `out_dir`, steering the layers named by `layers_spec`;
    `kernels`: auto | fused | stock, whether a GGUF's Q4_1 linears use grains-edge's own kernel."""
    out_dir = Path(out_dir).expanduser()
    if quantize not in QUANTIZATIONS:
        raise GrainsError(f"unknown quantization '{quantize}'; fix: use one of {', '.join(QUANTIZATIONS)}")
    sources.resolve(model_spec)  # a bad model name fails here, before any progress output
    started = time.perf_counter()
    ownership.check_replaceable(out_dir)  # and a bad --out, before the model loads
    ownership.remove_dead_staging(out_dir)
    try:
        staging = ownership.new_staging(out_dir)
    except OSError as error:
        raise GrainsError(
            f"cannot create a folder beside {out_dir} ({error.strerror or error}); fix: choose a writable --out folder"
        ) from error
    try:
        manifest = build(model_spec, staging, layers_spec, quantize, kernels)
        ownership.publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checks = manifest.verification
    log(
        f"wrote {out_dir} in {time.perf_counter() - started:.0f} s; ORT vs PyTorch: max relative logit error "
        f"{checks['zero']:.1e} (zero steering), {checks['steered']:.1e} (steered); "
        f"same argmax token {100 * checks['steered_argmax_agreement']:.0f} %"
    )
    return manifest


def build(model_spec: str, staging: Path, layers_spec: str, quantize: str, kernels: str) -> Manifest:
    """Load, export and verify into `staging`; returns the manifest written there."""
    log(f"loading {model_spec} …")
    # a quantized export needs no float32 copy of a bfloat16 checkpoint: the graph's float parts are its
    # values either way, and the reference logits only have to be within the quantization's tolerance
    model, tokenizer = sources.load(model_spec, keep_bfloat16=quantize != "none")
    spec = graph.graph_spec(model)
    num_layers = spec.num_layers
    steered = [] if layers_spec == "none" else parse_layers(layers_spec, num_layers)
    input_names, output_names = graph_io.io_names(num_layers)
    manifest = Manifest(
        source_model=model_spec,
        architecture=spec.family,
        num_layers=num_layers,
        hidden_size=spec.hidden,
        num_heads=spec.heads,
        num_kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        max_context=spec.max_context,
        steered_layers=steered,
        input_names=input_names,
        output_names=output_names,
        opset=OPSET,
        weights_fingerprint=sources.fingerprint(model),
        versions=package_versions(),
        quantization=quantize,
    )
    log(f"writing the ONNX graph: {num_layers} layers, steering after {len(steered)} of them …")
    blocks = source_blocks(model_spec, spec, quantize)
    custom_kernels = use_custom_kernels(kernels, blocks.kinds(), quantize)
    if not (custom_kernels and kernel_library.vector_kernels()):
        blocks = blocks.without_raw()
    manifest.kernels = "fused" if custom_kernels else "stock"  # the manifest's name for custom kernels
    manifest.weights = write_graph(model, spec, steered, staging / MODEL_NAME, quantize, blocks, custom_kernels)
    log(f"MatMul weights: {manifest.weights}")
    tokenizer.save_pretrained(staging)
    log("verifying ONNX Runtime against PyTorch (zero and non-zero steering, KV cache) …")
    expected = reference(model, manifest)
    del model, blocks  # ORT loads its own copy of the weights next: neither of these is held beside it
    gc.collect()
    manifest.verification = verify(expected, staging, manifest)
    manifest.save(staging / MANIFEST_NAME)
    return manifest
