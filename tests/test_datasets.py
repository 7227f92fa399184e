import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from grains_edge.errors import GrainsError
from grains_edge.evaluate import datasets

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
    with pytest.raises(GrainsError, match="row 2: not valid JSON"):
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


# ---- every parser: GrainsError or items, never another exception -------------------------------------------

LOADERS = {
    "pairs": datasets.load_pairs,
    "pairs letter, not-matching": lambda path: datasets.load_pairs(path, score="letter", toward="not-matching"),
    "truthfulqa": datasets.load_truthfulqa,
    "ab": datasets.load_ab,
    "ab letter": lambda path: datasets.load_ab(path, score="letter"),
    "dolly": datasets.load_dolly,
}
KEYS = [
    "question",
    "mc1_targets",
    "mc2_targets",
    "answer_matching_behavior",
    "answer_not_matching_behavior",
    "prompt",
    "correct",
    "incorrect",
    "correct_full_text",
    "incorrect_full_text",
    "preferred",
    "dispreferred",
    "instruction",
    "context",
    "response",
]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
TARGETS = st.dictionaries(st.text(max_size=6), st.sampled_from([0, 1]) | JSON, max_size=3)
# rows with the keys the parsers look for, holding anything: every field check is reached
ROW = st.dictionaries(st.sampled_from(KEYS), JSON | TARGETS | st.sampled_from(["(A)", "(B)", "Q\n(A) a\n(B) b"]))
DOCUMENT = st.lists(ROW, max_size=3) | JSON
TEXT = st.text(min_size=1, max_size=16).filter(str.strip)  # hypothesis text has no lone surrogates


def load_everything(content: bytes) -> None:
    """Every loader on `content` saved as .json and as .jsonl: items, or GrainsError and nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".json", ".jsonl"):
            path = Path(folder, "data" + suffix)
            path.write_bytes(content)
            for loader in LOADERS.values():
                try:
                    loaded = loader(path)
                except GrainsError as error:
                    assert "fix:" in str(error) and "\n" not in str(error)
                else:
                    assert all(len(part) for part in (loaded if isinstance(loaded, tuple) else [loaded]))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
@example(b"\xff\xfe[]")
@example(b"[" * 100_000)
@example(b"")
@example(b"[]")
def test_random_bytes_load_as_items_or_one_grains_error(content):
    load_everything(content)


@settings(max_examples=200, deadline=None)
@given(DOCUMENT, st.booleans())
def test_random_json_loads_as_items_or_one_grains_error(document, lines):
    if lines and isinstance(document, list):  # JSONL: one row per line
        content = "\n".join(json.dumps(row, ensure_ascii=False) for row in document)
    else:
        content = json.dumps(document, ensure_ascii=False)
    load_everything(content.encode("utf-8", "surrogatepass"))


def save_rows(folder: str, name: str, rows: list[dict]) -> Path:
    """The rows as a JSON list (.json) or one per line (.jsonl), raw non-ASCII (U+2028, U+0085 …) unescaped."""
    path = Path(folder, name)
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=5))
def test_generated_pairs_parse_to_their_rows_from_json_and_jsonl(triples):
    rows = [{"prompt": p, "preferred": a, "dispreferred": b} for p, a, b in triples]
    with tempfile.TemporaryDirectory() as folder:
        for name in ("pairs.json", "pairs.jsonl"):
            assert datasets.load_pairs(save_rows(folder, name, rows)) == [datasets.Pair(*t) for t in triples]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(TEXT, st.one_of(st.none(), st.just(""), TEXT), TEXT), min_size=1, max_size=5))
def test_generated_dolly_rows_parse_to_the_reference_prompts(rows):
    reference = ([f"{i}\n\n{c}" if c and c.strip() else i for i, c, _ in rows], [r for _, _, r in rows])
    records = [{"instruction": i, "context": c, "response": r} for i, c, r in rows]
    with tempfile.TemporaryDirectory() as folder:
        assert datasets.load_dolly(save_rows(folder, "dolly.jsonl", records)) == reference


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(TEXT, st.dictionaries(TEXT, st.sampled_from([0, 1]), min_size=2)), min_size=1, max_size=4))
def test_generated_truthfulqa_rows_parse_to_their_labels(rows):
    rows = [(q, targets) for q, targets in rows if set(targets.values()) == {0, 1}]
    records = [{"question": q, "mc1_targets": t, "mc2_targets": t} for q, t in rows]
    with tempfile.TemporaryDirectory() as folder:
        if not rows:
            with pytest.raises(GrainsError, match="needs a true"):
                datasets.load_truthfulqa(save_rows(folder, "tqa.json", [{"question": "q", "mc1_targets": {"a": 1}}]))
            return
        mc1, mc2 = datasets.load_truthfulqa(save_rows(folder, "tqa.json", records))
    expected = [datasets.MCItem(q, list(t), list(t.values())) for q, t in rows]
    assert mc1 == expected and mc2 == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[{"prompt": "p", "preferred": "a", "dispreferred": "caf\xe9"}]', r"not UTF-8 text \(byte 55 is 0xe9\)"),
        (b"[]", "has no rows"),
        (b"\n\n", "data.json is empty"),
        (b'{"prompt": "p"}', "holds an object, not a list"),
        (b'[{"prompt": "p", "preferred": "a", "dispreferred": "b"}, ["x"]]', "row 2 is a list, not an object"),
        (b'[{"prompt": "p", "preferred": 3, "dispreferred": "b"}]', "row 1: 'preferred' is a number, not text"),
        (b'[{"prompt": "p", "preferred": ["a"], "dispreferred": "b"}]', "'preferred' is a list, not text"),
        (b'[{"prompt": "\\ud800", "preferred": "a", "dispreferred": "b"}]', "unpaired"),
        (b'[{"prompt": "p", "preferred": "  ", "dispreferred": "b"}]', "'preferred' is empty"),
        (b'[{"question": "q", "mc1_targets": ["a", "b"]}]', "'mc1_targets' is a list, not an object"),
        (b'[{"question": "q", "mc1_targets": {"a": 1, "b": "0"}}]', "label '0', not 0 or 1"),
        (b'[{"question": "q", "mc1_targets": {"a": 1, "b": 1}}]', "needs a true"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_files_name_the_file_row_and_fix(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(GrainsError, match=message) as raised:
        datasets.load_pairs(path)
    assert "data.json" in str(raised.value) and "fix:" in str(raised.value)


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_are_skipped(tmp_path):
    good = json.dumps({"instruction": "i", "response": "r"})
    path = tmp_path / "dolly.jsonl"
    path.write_text(f"{good}\n\n{good}\n" + json.dumps({"instruction": "i", "context": 7, "response": "r"}))
    with pytest.raises(GrainsError, match="dolly.jsonl row 4: 'context' is a number"):
        datasets.load_dolly(path)


def test_a_directory_or_missing_file_is_one_error(tmp_path):
    with pytest.raises(GrainsError, match="is not a file"):
        datasets.load_dolly(tmp_path)
    with pytest.raises(GrainsError, match="data file not found"):
        datasets.load_dolly(tmp_path / "missing.jsonl")


def test_splits_partition_the_items_and_train_plus_tune_is_all_but_report():
    items = [f"item {i}" for i in range(400)]
    parts = {
        split: datasets.select(items, split, str) for split in ("train", "tune", "report", "validation", "train+tune")
    }
    assert sorted(parts["train"] + parts["tune"] + parts["report"]) == sorted(items)
    assert sorted(parts["validation"]) == sorted(parts["tune"] + parts["report"])
    assert sorted(parts["train+tune"]) == sorted(parts["train"] + parts["tune"])
    assert min(len(parts[s]) for s in ("train", "tune", "report")) > 40
