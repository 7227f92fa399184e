"""Shared fixtures: tiny random-weight Llama and GPT-2 models (no downloads), their exports, and
one export of the real embedded model, each built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Steering vectors change what a language model says without training it.",
    "Integrated gradients attribute a prediction to the input tokens.",
    "Hello, how are you today? I am fine, thank you!",
] * 20


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own GRAINS_EDGE_HOME: nothing touches the user's real data."""
    monkeypatch.setenv("GRAINS_EDGE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One GRAINS_EDGE_CACHE per run: the kernels compile once, outside the user's cache."""
    previous = os.environ.get("GRAINS_EDGE_CACHE")
    os.environ["GRAINS_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("GRAINS_EDGE_CACHE")
    else:
        os.environ["GRAINS_EDGE_CACHE"] = previous


@pytest.fixture
def needs_kernels():
    """Skips a test of grains-edge's own kernels where they cannot be built, decided in the run's own cache."""
    from grains_edge import kernels

    reason = kernels.unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            eos_token_id=2,
            pad_token_id=2,
        )
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=128, eos_token_id=2)


def tiny_model(arch: str, vocab_size: int = 300):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    with torch.no_grad():  # larger weights than the init default, so steering visibly matters
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random-weight model folder with a tokenizer, as a user would pass with --model."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_model(request.param, len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    from grains_edge.export.onnx_export import export

    out = tmp_path_factory.mktemp("exports") / tiny_model_dir.name
    export(str(tiny_model_dir), out, layers_spec="1-2")
    return out


@pytest.fixture(scope="session")
def default_export(tmp_path_factory) -> Path:
    """The real embedded SmolLM2-135M-Instruct, exported once per run (about a minute)."""
    from grains_edge.export.onnx_export import export

    cached = os.environ.get("GRAINS_EDGE_TEST_DEFAULT_EXPORT")
    if cached and Path(cached, "manifest.json").is_file():
        return Path(cached)
    out = tmp_path_factory.mktemp("default") / "smollm2"
    export("default", out)
    return out
