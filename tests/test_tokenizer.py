"""ChatTokenizer against transformers' own tokenizer on the same files: the same ids, text and special tokens."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from grains_edge.errors import GrainsError
from grains_edge.runtime.tokenizer import ChatTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Steering vectors, déjà vu — 数字 ✓"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "  spaces\n\nand lines  "},
    ],
]


def reference_ids(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def check_parity(folder) -> None:
    ours, theirs = ChatTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        ids = ours.chat_ids(messages)
        assert ids == reference_ids(theirs, messages)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    text = "The capital of France is Paris."
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.get_vocab() == theirs.get_vocab()


def test_matches_transformers_on_a_tiny_export(tiny_export):
    check_parity(tiny_export)


def test_matches_transformers_on_the_default_model(default_export):
    check_parity(default_export)  # its template adds a default system prompt when there is none


def test_without_a_chat_template_roles_are_plain_lines(tiny_export, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_export / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = ChatTokenizer(tmp_path)
    assert ours.chat_template is None
    assert ours.decode(ours.chat_ids(CONVERSATIONS[0])) == "user: What is the capital of France?\nassistant:"


def test_template_errors_and_missing_files_are_clear(tiny_export, tmp_path):
    with pytest.raises(GrainsError, match="has no tokenizer.json; fix: re-run 'grains-edge export'"):
        ChatTokenizer(tmp_path)
    ours = ChatTokenizer(tiny_export)
    ours.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(GrainsError, match="refused the conversation: only user turns"):
        ours.chat_ids(CONVERSATIONS[0])


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("tokenizer.json", "{truncated", "tokenizer.json is damaged"),
        ("tokenizer.json", '{"model": {"type": "nonsense"}}', "tokenizer.json is damaged"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json is damaged \\(not a JSON object"),
        ("tokenizer_config.json", '{"eos_token": 5}', "special token is neither"),
        ("chat_template.jinja", "{% for m in messages %}{{ m", "chat template does not parse"),
        ("chat_template.jinja", "{{ messages[0].content.nope() }}", "chat template failed"),
    ],
)
def test_damaged_tokenizer_files_are_one_line_naming_the_file(tiny_export, tmp_path, name, content, problem):
    for path in tiny_export.iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / name).write_text(content)
    with pytest.raises(GrainsError, match=f"{problem}.*fix:"):
        ChatTokenizer(tmp_path).chat_ids(CONVERSATIONS[0])


TEXTS = ["Hello wörld, ünïcödé 🐉 dragon — 数字 ✓", "  spaces\n\nand lines  ", "<|im_end|> after a special token"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_whole_decode_token_by_token(default_export, text):
    tokenizer = ChatTokenizer(default_export)
    ids = tokenizer.encode(text, add_special_tokens=False)
    answer = tokenizer.stream()
    for count, token in enumerate(ids, 1):
        whole = tokenizer.decode(ids[:count])
        streamed = answer.add(token)
        assert whole.startswith(streamed)  # a token holding an incomplete character waits for it whole
        if not whole.endswith("\ufffd"):
            assert streamed == whole


def test_streamed_text_of_random_tokens_is_the_whole_decode(default_export):
    tokenizer = ChatTokenizer(default_export)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tokenizer.backend.get_vocab_size(), 40).tolist()  # lone bytes, special tokens
        answer = tokenizer.stream()
        for token in ids:
            answer.add(token)
        assert answer.text == tokenizer.decode(ids).rstrip("\ufffd")
