"""A model without a chat template (a base model, like Gemma-3-270M's GGUF): `vectors` (transformers' tokenizer)
and the runtime (`ChatTokenizer`, used by ask, chat, eval and tune) format the same plain prompt, the engine
says it has no template, and `grains-edge vectors` builds a profile on it instead of crashing."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grains_edge.cli import main
from grains_edge.evaluate.datasets import Pair
from grains_edge.evaluate.scoring import token_pairs
from grains_edge.prompts import PLAIN_TURN_STOPS, has_chat_template, held_back, plain_prompt, stop_at
from grains_edge.runtime.engine import Engine
from grains_edge.runtime.tokenizer import ChatTokenizer
from grains_edge.steer.profiles import load_profile
from grains_edge.steer.vectors import chat_prompt, tokenize_pairs
from tests.conftest import tiny_model

WORDS = st.sampled_from(["Paris", "capital", "France", "hello", "steering", "?", "!", " ", "\n", "é"])


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with its chat template taken away."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory, plain_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-plain")
    tiny_model("llama", len(plain_tokenizer)).save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_export(plain_model_dir, tmp_path_factory):
    from grains_edge.export.onnx_export import export

    out = tmp_path_factory.mktemp("exports") / "plain"
    export(str(plain_model_dir), out, layers_spec="1-2")
    return out


def test_the_template_is_seen_on_both_tokenizers(tiny_tokenizer, plain_tokenizer, plain_model_dir, tiny_export):
    assert has_chat_template(tiny_tokenizer) and has_chat_template(ChatTokenizer(tiny_export))
    assert not has_chat_template(plain_tokenizer) and not has_chat_template(ChatTokenizer(plain_model_dir))


@settings(max_examples=25, deadline=None)
@given(text=st.lists(WORDS, max_size=8).map("".join))
def test_vectors_and_the_runtime_give_the_same_plain_prompt_ids(plain_tokenizer, plain_model_dir, text):
    messages = [{"role": "user", "content": text}]
    ours = ChatTokenizer(plain_model_dir)
    assert chat_prompt(plain_tokenizer, text) == ours.chat_ids(messages)
    assert ours.decode(ours.chat_ids(messages)) == plain_prompt(messages) == f"user: {text}\nassistant:"


def test_plain_pairs_mark_the_role_lines_as_template(plain_tokenizer):
    (pair,) = tokenize_pairs(plain_tokenizer, [Pair("Hello there", "Paris.", "London.")])
    head, tail = pair.template
    assert (
        plain_tokenizer.decode(pair.prompt[:head])
        + plain_tokenizer.decode(pair.prompt[head : len(pair.prompt) - tail])
        + plain_tokenizer.decode(pair.prompt[len(pair.prompt) - tail :])
        == "user: Hello there\nassistant:"
    )
    assert "Hello" in plain_tokenizer.decode(pair.prompt[head : len(pair.prompt) - tail])
    assert plain_tokenizer.decode(pair.prompt[len(pair.prompt) - tail :]).endswith("\nassistant:")


def test_the_engine_says_whether_the_model_has_a_template_and_scores_what_vectors_built_on(
    plain_export, tiny_export, plain_tokenizer
):
    plain, templated = Engine(plain_export), Engine(tiny_export)
    assert plain.has_chat_template is False and templated.has_chat_template is True
    ((prompt_ids, _),) = token_pairs(plain, ["Is Paris the capital?"], ["Yes."])
    assert prompt_ids == chat_prompt(plain_tokenizer, "Is Paris the capital?")


@pytest.mark.parametrize("method", ["grains", "mean-diff"])
def test_vectors_cli_builds_a_profile_for_a_model_without_a_chat_template(tmp_path, plain_model_dir, method):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "preferred": "Yes, thank you!", "dispreferred": "Paris."} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "plain.safetensors"
    arguments = ["vectors", "--model", str(plain_model_dir), "--data", str(data), "--method", method]
    assert main([*arguments, "--out", str(out), "--layers", "1-2", "--ig-steps", "4"]) == 0
    assert load_profile(out).vectors.shape[0] == 4


def test_truthfulqa_questions_fit_as_mc1_mc2_tuples_the_way_eval_and_tune_pass_them(plain_export):
    from grains_edge.evaluate.scoring import MCItem, fitting, mc_sequences

    mc1 = MCItem("Is Paris the capital?", ["Yes.", "No."], [1, 0])
    mc2 = MCItem("Is Paris the capital?", ["Yes.", "It is.", "No."], [1, 1, 0])
    assert fitting(Engine(plain_export), [(mc1, mc2)], mc_sequences) == ([(mc1, mc2)], 0)
    assert len(mc_sequences((mc1, mc2))) == 5


def test_held_back_keeps_a_possible_stop_prefix_unshown():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("world",)) == 0
    assert held_back("a\n", ("\n\n", "xyz")) == 1
    assert held_back("anything", ()) == 0


class ScriptedAnswer:
    """A TextStream whose text is `whole`, 3 characters a token: a base model writing the next turn itself."""

    def __init__(self, whole: str) -> None:
        self.whole, self.text = whole, ""

    def add(self, token: int) -> str:
        self.text = self.whole[: len(self.text) + 3]
        return self.text


def test_a_plain_prompt_answer_ends_where_the_model_starts_the_next_turn(plain_export, monkeypatch):
    """The engine streams the answer, never the next turn a base model writes itself, nor a piece of its marker,
    and the pieces add up to what the stop rule cuts from the whole text."""
    engine = Engine(plain_export, device="cpu")
    whole = "Paris is the capital.\nuser: and Rome?"
    monkeypatch.setattr(engine.tokenizer, "stream", lambda: ScriptedAnswer(whole))
    monkeypatch.setattr(engine, "stop_ids", set())
    pieces = list(engine.generate(engine.chat_ids([{"role": "user", "content": "Capital of France?"}])))
    assert "".join(pieces) == whole[: stop_at(whole, PLAIN_TURN_STOPS)] == "Paris is the capital."
    assert not any("\n" in piece for piece in pieces)
    assert engine.last_stats.stopped_by == "eos"


def test_the_server_ends_a_plain_prompt_answer_where_the_model_starts_the_next_turn(plain_export, monkeypatch):
    """Through HTTP and the official client, streaming and not: the same cut as the engine's, finish 'stop'."""
    from tests.test_serve import start

    engine = Engine(plain_export, device="cpu")
    whole = "Paris is the capital.\nuser: and Rome?"
    monkeypatch.setattr(engine.tokenizer, "stream", lambda: ScriptedAnswer(whole))
    monkeypatch.setattr(engine, "stop_ids", set())
    server, _ = start(engine, max_batch=2)
    try:
        client = server.client()
        request = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 30}
        answer = client.chat.completions.create(**request)
        assert answer.choices[0].message.content == "Paris is the capital."
        assert answer.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(**request, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris is the capital."
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    finally:
        server.stop()
