import json

import pytest

from grains_edge import datasets
from grains_edge.errors import GrainsError

CAA = {
    "question": "Do you have hobbies?\n\nChoices:\n(A) As an AI, I do not.\n(B) I love painting.",
    "answer_matching_behavior": "(A)",
    "answer_not_matching_behavior": "(B)",
}
TRUTHFUL = {
    "question": "Is the sky green?",
    "mc1_targets": {"No, it is blue.": 1, "Yes.": 0, "Sometimes green.": 0},
    "mc2_targets": {"No, it is blue.": 1, "No.": 1, "Yes.": 0},
}


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def test_caa_pairs_use_the_option_text_or_the_letter(tmp_path):
    path = write(tmp_path, "caa.json", [CAA])
    assert datasets.load_pairs(path)[0].preferred == "As an AI, I do not."
    assert datasets.load_pairs(path, score="letter")[0].dispreferred == "(B)"


def test_truthfulqa_pairs_and_items(tmp_path):
    path = write(tmp_path, "tqa.json", [TRUTHFUL])
    pair = datasets.load_pairs(path)[0]
    assert (pair.preferred, pair.dispreferred) == ("No, it is blue.", "Yes.")
    mc1, mc2 = datasets.load_truthfulqa(path)
    assert mc1[0].labels == [1, 0, 0] and mc2[0].labels == [1, 1, 0]


def test_plain_jsonl_pairs_and_row_numbers_in_errors(tmp_path):
    good = {"prompt": "p", "preferred": "a", "dispreferred": "b"}
    assert len(datasets.load_pairs(write(tmp_path, "ok.jsonl", [good, good]))) == 2
    with pytest.raises(GrainsError, match="row 2: missing text field 'dispreferred'"):
        datasets.load_pairs(write(tmp_path, "bad.jsonl", [good, {"prompt": "p", "preferred": "a"}]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(GrainsError, match="row 2: not JSON"):
        datasets.load_pairs(broken)
    with pytest.raises(GrainsError, match="unknown data format"):
        datasets.load_pairs(write(tmp_path, "other.json", [{"text": "x"}]))


def test_mmlu_and_dolly(tmp_path):
    row = {
        "prompt": "Q\n\nChoices:\n(A) 1\n(B) 2",
        "correct": "(B)",
        "incorrect": "(A)",
        "correct_full_text": "2",
        "incorrect_full_text": "1",
    }
    item = datasets.load_ab(write(tmp_path, "mmlu.json", [row]))[0]
    assert (item.matching, item.other) == ("2", "1")
    prompts, responses = datasets.load_dolly(
        write(
            tmp_path,
            "d.jsonl",
            [
                {"instruction": "Sum it up", "context": "Some text", "response": "Short."},
                {"instruction": "Say hi", "context": "", "response": "Hi."},
            ],
        )
    )
    assert prompts == ["Sum it up\n\nSome text", "Say hi"] and responses == ["Short.", "Hi."]


def test_split_is_deterministic_and_disjoint():
    items = [f"question {i}" for i in range(200)]
    train, validation = datasets.split(items, str)
    assert (train, validation) == datasets.split(list(reversed(items))[::-1], str)
    assert not set(train) & set(validation) and 40 < len(validation) < 80


def test_the_shipped_data_loads():
    from grains_edge.data import data_file

    assert len(datasets.load_truthfulqa(data_file("truthfulqa_mc_train.json"))[0]) == 405
    assert len(datasets.load_pairs(data_file("caa/refusal_generate.json"))) == 408


def test_the_shipped_subsets_are_their_rule_applied_to_the_whole_sets():
    """grains_edge/data/README.md: each subset keeps the rows of its source that match its rule, unchanged."""
    from grains_edge.data import data_file

    def rows(name):
        return json.loads(data_file(name).read_text())

    def option(row, answer):  # the text of option "(X)" in the question
        return row["question"].split(f"({answer.strip()[1]}) ", 1)[1]

    sycophancy = rows("caa/sycophancy_generate.json")
    stated = [r for r in sycophancy if "Do you agree or disagree with the following claim" in r["question"]]
    assert rows("caa/sycophancy_stated_view.json") == stated and len(stated) == 498
    hallucination = rows("caa/hallucination_generate.json")
    honest = "No, that's not accurate"
    yes_no = [r for r in hallucination if option(r, r["answer_not_matching_behavior"]).startswith(honest)]
    assert rows("caa/hallucination_yes_no.json") == yes_no and len(yes_no) == 331
