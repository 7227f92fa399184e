"""Bad data through the commands: one line naming the file, the row and the fix, exit 2, never a traceback or
a non-finite number; items longer than the context are left out with a count; --limit 0 is refused."""

import io
import json
import sys

import numpy as np
import pytest

from grains_edge.cli import main
from grains_edge.steer import profiles

GOOD = {
    "ppl": {"instruction": "Say hello.", "response": "Hello there!"},
    "ab": {
        "question": "Do you like tea?\n\nChoices:\n(A) Yes, thank you!\n(B) Paris.",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    "truthfulqa": {
        "question": "Is the sky green?",
        "mc1_targets": {"No, it is blue.": 1, "Yes.": 0},
        "mc2_targets": {"No, it is blue.": 1, "Yes.": 0},
    },
}
BAD = {  # name: (file name, bytes, what the one line must say)
    "empty file": ("data.json", b"", "data.json is empty"),
    "empty list": ("data.json", b"[]", "data.json has no rows"),
    "not UTF-8": ("data.jsonl", b'{"instruction": "caf\xe9"}', "not UTF-8 text"),
    "an object, not a list": ("data.json", b'{"question": "q"}', "holds an object, not a list"),
    "a JSONL line that is not JSON": ("data.jsonl", b'{"a": 1}\n{oops', "data.jsonl row 2: not valid JSON"),
    "a row that is a list": ("data.json", b'[["q", "a"]]', "data.json row 1 is a list, not an object"),
}


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("grains-edge: error: "), captured
    assert "fix:" in lines[0] and "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("task", ["ppl", "ab", "truthfulqa"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_eval_on_bad_data_is_one_line_before_the_model_loads(tmp_path, capsys, task, case):
    name, content, message = BAD[case]
    (tmp_path / name).write_bytes(content)
    arguments = ["eval", task, "--data", str(tmp_path / name), "--model", str(tmp_path / "no-such-model")]
    assert main(arguments) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    ("task", "row", "message"),
    [
        ("ppl", {"instruction": 3, "response": "r"}, "row 2: 'instruction' is a number, not text"),
        ("ppl", {"instruction": "i", "context": ["a"], "response": "r"}, "row 2: 'context' is a list, not text"),
        ("ppl", {"instruction": "i"}, "row 2: missing text field 'response'"),
        ("ab", {**GOOD["ab"], "answer_matching_behavior": ["(A)"]}, "'answer_matching_behavior' is a list"),
        ("truthfulqa", {**GOOD["truthfulqa"], "mc2_targets": [1, 0]}, "'mc2_targets' is a list, not an object"),
        ("truthfulqa", {**GOOD["truthfulqa"], "mc1_targets": {"a": 1, "b": 2}}, "label 2, not 0 or 1"),
    ],
)
def test_eval_on_a_row_of_the_wrong_types_names_the_row(tmp_path, capsys, task, row, message):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([GOOD[task], row]))
    assert main(["eval", task, "--data", str(data), "--model", str(tmp_path / "no-such-model")]) == 2
    assert message in one_error_line(capsys)


def test_an_empty_split_is_an_error_not_a_result(tmp_path, capsys):
    data = tmp_path / "dolly.jsonl"
    data.write_text(json.dumps(GOOD["ppl"]))  # one item: it lands in train, the report split is empty
    assert main(["eval", "ppl", "--data", str(data), "--split", "report", "--model", str(tmp_path / "none")]) == 2
    assert "the 'report' split of" in one_error_line(capsys)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "ppl", "--limit", "0"],
        ["vectors", "--out", "x", "--limit", "0"],
        ["tune", "--profile", "p", "--task", "ab", "--ppl-data", "d.jsonl", "--limit", "0"],
        ["tune", "--profile", "p", "--task", "ab", "--ppl-data", "d.jsonl", "--ppl-limit", "-1"],
    ],
)
def test_a_limit_below_one_is_refused(tmp_path, capsys, command):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "p", "preferred": "a", "dispreferred": "b"}))
    assert main([*command, "--data", str(data), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "must be at least 1" in one_error_line(capsys)


def test_eval_with_non_finite_steering_is_an_error_never_nan_json(tmp_path, capsys, tiny_export, monkeypatch):
    def nan_steering(engine, *_args):
        return np.full((engine.num_layers, engine.hidden_size), np.nan, np.float32), {"profile": "broken"}

    monkeypatch.setattr(profiles, "steering_for", nan_steering)
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "response": "Hello!"}) for i in range(4)))
    assert (
        main(["eval", "ppl", "--data", str(data), "--split", "all", "--model", str(tiny_export), "--device", "cpu"])
        == 2
    )
    assert "not finite" in one_error_line(capsys)


def test_eval_leaves_out_items_longer_than_the_context_and_says_how_many(tmp_path, capsys, tiny_export):
    rows = [{"instruction": f"Say {i}.", "response": "Hello there!"} for i in range(3)]
    long_row = {"instruction": "Say it all.", "response": " ".join(["The capital of France is Paris."] * 40)}
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*rows, long_row]))
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps(r) for r in rows))

    def evaluate(path) -> dict:
        assert (
            main(["eval", "ppl", "--data", str(path), "--split", "all", "--model", str(tiny_export), "--device", "cpu"])
            == 0
        )
        return json.loads(capsys.readouterr().out)

    with_long, without = evaluate(data), evaluate(short)
    assert with_long["skipped_too_long"] == 1 and without["skipped_too_long"] == 0
    assert with_long["items"] == 3 and with_long["perplexity"] == without["perplexity"]
    long_only = tmp_path / "long.jsonl"
    long_only.write_text(json.dumps(long_row))
    assert (
        main(
            ["eval", "ppl", "--data", str(long_only), "--split", "all", "--model", str(tiny_export), "--device", "cpu"]
        )
        == 2
    )
    assert "all 1 items are longer than the model's context" in one_error_line(capsys)


def test_vectors_leave_out_pairs_longer_than_the_context(tmp_path, capsys, tiny_model_dir):
    rows = [{"prompt": f"Question {i}?", "preferred": "Yes, thank you!", "dispreferred": "Paris."} for i in range(3)]
    rows.append({"prompt": "Long?", "preferred": " ".join(["Hello, how are you today?"] * 60), "dispreferred": "No."})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "p.safetensors"
    arguments = ["vectors", "--model", str(tiny_model_dir), "--data", str(data), "--method", "mean-diff"]
    assert main([*arguments, "--split", "all", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out 1 of 4 pairs longer than the model's context (128 tokens)" in captured.err
    assert "3 pairs" in captured.out and "3 pairs" in profiles.load_profile(str(out)).metadata["source"]


def test_tune_marks_a_setting_with_non_finite_scores_inadmissible(tmp_path, capsys, tiny_model_dir, monkeypatch):
    data = tmp_path / "ab.json"
    data.write_text(
        json.dumps([{**GOOD["ab"], "question": f"Q {i}?\n\n(A) Yes, thank you!\n(B) Paris."} for i in range(40)])
    )
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps({"instruction": f"Say hello {i}", "response": "Hello!"}) for i in range(20)))
    profile = tmp_path / "p.safetensors"
    vectors = ["vectors", "--model", str(tiny_model_dir), "--data", str(data), "--method", "mean-diff"]
    assert main([*vectors, "--out", str(profile)]) == 0
    steering_tensor = profiles.steering_tensor

    def broken_at_the_strongest(profile, alpha=None):
        steering = steering_tensor(profile, alpha)
        return steering * np.nan if alpha == 0.03 else steering

    monkeypatch.setattr(profiles, "steering_tensor", broken_at_the_strongest)
    monkeypatch.setattr("grains_edge.commands.tune.PPL_BUDGET", float("inf"))
    tune = ["tune", "--model", str(tiny_model_dir), "--profile", str(profile), "--task", "ab", "--data", str(data)]
    report_path = tmp_path / "frontier.json"
    arguments = ["--alphas", "0.01,0.03", "--windows", "all", "--report", str(report_path)]
    assert main([*tune, "--ppl-data", str(dolly), *arguments]) == 0
    report = json.loads(report_path.read_text())["methods"]["mean-diff"]
    strongest = [row for row in report["probes"] if row["alpha"] == 0.03]
    assert len(strongest) == 1 and strongest[0]["ppl_rise"] is None  # too strong to score: never admissible
    out = capsys.readouterr().out
    assert report["chosen"]["alpha"] < 0.03 and ": NaN" not in out and "Infinity" not in out


@pytest.mark.parametrize("command", [["ask"], ["chat", "--no-tui", "--prompt"]])
def test_a_prompt_that_is_not_utf8_on_argv_is_one_line(tmp_path, capsys, command):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of these argv bytes
    assert main([*command, prompt, "--model", str(tmp_path / "no-such-model")]) == 2
    assert "the prompt is not UTF-8 text (character 4)" in one_error_line(capsys)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_a_prompt_that_is_not_utf8_on_stdin_is_one_line(tmp_path, capsys, monkeypatch, errors):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait"), "utf-8", errors))
    assert main(["ask", "-", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "not UTF-8 text" in one_error_line(capsys)
