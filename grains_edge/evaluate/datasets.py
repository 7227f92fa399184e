"""The data formats grains-edge reads, as contrastive pairs and evaluation items.

  * TruthfulQA multiple choice JSON: [{question, mc1_targets: {answer: 0|1}, mc2_targets: {...}}]
  * CAA A/B JSON: [{question (with "Choices: (A) … (B) …"), answer_matching_behavior,
    answer_not_matching_behavior}], the matching answer being the behaviour to steer toward
  * 2-choice MMLU (CAA test format): [{prompt, correct, incorrect, correct_full_text, …}]
  * Dolly JSONL: {instruction, context, response}
  * plain JSONL of {"prompt", "preferred", "dispreferred"} for a user's own behaviour
Anything else (a file that is not UTF-8 or not JSON, a row of the wrong shape, a field of the wrong type,
no rows at all) is one GrainsError naming the file, the row and the fix. Splits are deterministic:
an item goes to validation when the SHA-256 of its key text falls in the validation fraction.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from grains_edge.errors import GrainsError

T = TypeVar("T")
CHOICE = re.compile(r"^\(([A-Z])\)\s*(.*?)\s*$")


@dataclass
class MCItem:
    question: str
    choices: list[str]
    labels: list[int]  # 1 = true


@dataclass
class ABItem:
    question: str  # includes "Choices: (A) … (B) …"
    matching: str  # the preferred answer: "(A)" or its text
    other: str


@dataclass
class Pair:
    prompt: str
    preferred: str
    dispreferred: str


Row = tuple[int, dict]  # (row number as the user counts it: line of a JSONL, 1-based index of a JSON list, row)


def where(path: str | Path, number: int) -> str:
    return f"{Path(path).name} row {number}"


def kind_of(value) -> str:
    """The JSON type of a parsed value, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "text"


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped)."""
    if not path.exists():
        raise GrainsError(f"data file not found: {path}; fix: pass an existing .json or .jsonl file")
    if not path.is_file():
        raise GrainsError(f"{path} is not a file; fix: pass a .json or .jsonl file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise GrainsError(
            f"{path.name} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}); "
            "fix: save the file as UTF-8"
        ) from None
    except OSError as error:
        raise GrainsError(f"cannot read {path} ({error.strerror}); fix: check the file's permissions") from None


def parse_json(text: str, what: str, fix: str):
    """json.loads with its failures (bad syntax, nesting deeper than Python's recursion limit) as GrainsError."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise GrainsError(f"{what}: not valid JSON ({detail}); fix: {fix}") from None


def read_rows(path: str | Path) -> list[Row]:
    """The numbered rows of a JSON list or a JSONL file: each row a JSON object, at least one row."""
    path = Path(path).expanduser()
    text = read_text(path)
    if not text.strip():
        raise GrainsError(f"{path.name} is empty; fix: add rows (a JSON list of objects, or one object per line)")
    if path.suffix.lower() == ".jsonl":
        # "\n" only: str.splitlines also splits at U+2028, U+0085 and others, which JSON keeps raw inside strings.
        lines = enumerate(text.split("\n"), 1)
        rows = [(n, parse_json(line, where(path, n), "one JSON object per line")) for n, line in lines if line.strip()]
    else:
        parsed = parse_json(text, path.name, "a JSON list of objects, [{…}, {…}]")
        if not isinstance(parsed, list):
            raise GrainsError(f"{path.name}: the file holds {kind_of(parsed)}, not a list; fix: wrap the rows in [ … ]")
        rows = list(enumerate(parsed, 1))
    if not rows:
        raise GrainsError(f"{path.name} has no rows; fix: add at least one row")
    for number, row in rows:
        if not isinstance(row, dict):
            raise GrainsError(f"{where(path, number)} is {kind_of(row)}, not an object; fix: make each row {{…}}")
    return rows


def checked_text(value, name: str, path: str | Path, number: int) -> str:
    """`value` if it is non-blank text that encodes as UTF-8 (a JSON \\ud800 escape decodes to a lone surrogate)."""
    if not isinstance(value, str):
        raise GrainsError(f"{where(path, number)}: '{name}' is {kind_of(value)}, not text; fix: make it a JSON string")
    if not value.strip():
        raise GrainsError(f"{where(path, number)}: '{name}' is empty; fix: give it some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise GrainsError(
            f"{where(path, number)}: '{name}' holds an unpaired \\u surrogate escape; fix: write the character itself"
        ) from None
    return value


def field(row: dict, name: str, path: str | Path, number: int) -> str:
    if name not in row:
        raise GrainsError(f"{where(path, number)}: missing text field '{name}'; fix: add it to the row")
    return checked_text(row[name], name, path, number)


def option_texts(question: str) -> dict[str, str]:
    """{"A": text, "B": text} from the "(A) … (B) …" lines of a CAA question."""
    options: dict[str, str] = {}
    for line in question.splitlines():
        match = CHOICE.match(line.strip())
        if match:
            options[match.group(1)] = match.group(2)
    return options


def letter(answer: str) -> str:
    match = re.search(r"\(([A-Z])\)", answer)
    return match.group(1) if match else ""


def detect_format(rows: list[Row], path: str | Path) -> str:
    """The format of a file, told by the keys of its first row."""
    first = rows[0][1]
    if "mc1_targets" in first:
        return "truthfulqa"
    if "answer_matching_behavior" in first:
        return "caa"
    if "correct" in first and "prompt" in first:
        return "mmlu"
    if "preferred" in first:
        return "pairs"
    if "response" in first and "instruction" in first:
        return "dolly"
    raise GrainsError(
        f"{Path(path).name}: unknown data format (row {rows[0][0]} has keys {sorted(first)[:6]}); fix: use "
        "TruthfulQA MC JSON, CAA A/B JSON, Dolly JSONL, or JSONL of {prompt, preferred, dispreferred}"
    )


def nonempty(items: list[T], path: str | Path, what: str) -> list[T]:
    if not items:
        raise GrainsError(f"{Path(path).name} gives no {what}; fix: add rows that have them")
    return items


def load_pairs(
    path: str | Path, score: str = "text", false_per_question: int = 1, toward: str = "matching"
) -> list[Pair]:
    """Contrastive pairs from any supported format. TruthfulQA: the true MC1 answer against the first
    `false_per_question` false ones. CAA: the matching answer as its option text ("text") or letter."""
    rows = read_rows(path)
    kind = detect_format(rows, path)
    pairs: list[Pair] = []
    for number, row in rows:
        if kind == "truthfulqa":
            item = mc_item(row, "mc1_targets", path, number)
            true = [c for c, label in zip(item.choices, item.labels, strict=True) if label]
            false = [c for c, label in zip(item.choices, item.labels, strict=True) if not label]
            pairs += [Pair(item.question, true[0], wrong) for wrong in false[:false_per_question]]
        elif kind == "caa":
            item = ab_item(row, path, number, score, toward)
            pairs.append(Pair(item.question, item.matching, item.other))
        elif kind == "pairs":
            pairs.append(
                Pair(
                    field(row, "prompt", path, number),
                    field(row, "preferred", path, number),
                    field(row, "dispreferred", path, number),
                )
            )
        else:
            raise GrainsError(f"{Path(path).name} has no contrastive pairs ({kind}); fix: pass a behaviour data set")
    return nonempty(pairs, path, "contrastive pairs")


def mc_item(row: dict, key: str, path: str | Path, number: int) -> MCItem:
    """The question and its {answer: 0|1} targets, at least one true and one false answer."""
    question = field(row, "question", path, number)
    targets = row.get(key)
    fix = f"fix: make '{key}' an object {{answer text: 1 if true else 0}} with a true and a false answer"
    if not isinstance(targets, dict):
        problem = "missing" if key not in row else f"{kind_of(targets)}, not an object"
        raise GrainsError(f"{where(path, number)}: '{key}' is {problem}; {fix}")
    for answer, label in targets.items():
        checked_text(answer, f"{key} answer", path, number)
        if type(label) is not int or label not in (0, 1):
            raise GrainsError(f"{where(path, number)}: '{key}' gives {answer!r} the label {label!r}, not 0 or 1; {fix}")
    labels = list(targets.values())
    if 1 not in labels or 0 not in labels:
        raise GrainsError(f"{where(path, number)}: '{key}' needs a true (1) and a false (0) answer; {fix}")
    return MCItem(question, list(targets), labels)


def load_truthfulqa(path: str | Path) -> tuple[list[MCItem], list[MCItem]]:
    """(MC1 items, MC2 items) in file order."""
    rows = read_rows(path)
    if detect_format(rows, path) != "truthfulqa":
        raise GrainsError(f"{Path(path).name} is not TruthfulQA MC JSON; fix: pass mc_task-style data")
    mc1 = [mc_item(row, "mc1_targets", path, n) for n, row in rows]
    mc2 = [mc_item(row, "mc2_targets", path, n) for n, row in rows]
    return mc1, mc2


def ab_item(row: dict, path: str | Path, number: int, score: str, toward: str = "matching") -> ABItem:
    """The A/B item with `matching` = the answer to steer toward: the behaviour-matching one, or with
    toward="not-matching" the other (for behaviours to steer away from, like sycophancy)."""
    item = ab_item_matching(row, path, number, score)
    return item if toward == "matching" else ABItem(item.question, item.other, item.matching)


def ab_item_matching(row: dict, path: str | Path, number: int, score: str) -> ABItem:
    question = field(row, "question", path, number)
    matching = field(row, "answer_matching_behavior", path, number)
    other = field(row, "answer_not_matching_behavior", path, number)
    if score == "letter":
        return ABItem(question, matching.strip(), other.strip())
    options = option_texts(question)
    if letter(matching) not in options or letter(other) not in options:
        raise GrainsError(f"{where(path, number)}: cannot find the (A)/(B) option texts; fix: use --score letter")
    if not options[letter(matching)] or not options[letter(other)]:
        raise GrainsError(f"{where(path, number)}: an (A)/(B) option has no text; fix: use --score letter")
    return ABItem(question, options[letter(matching)], options[letter(other)])


def load_ab(path: str | Path, score: str = "text", toward: str = "matching") -> list[ABItem]:
    """CAA A/B items (matching = the behaviour) or 2-choice MMLU items (matching = the correct answer)."""
    rows = read_rows(path)
    kind = detect_format(rows, path)
    if kind == "caa":
        return [ab_item(row, path, n, score, toward) for n, row in rows]
    if kind == "mmlu":
        suffix = "" if score == "letter" else "_full_text"
        return [
            ABItem(
                field(r, "prompt", path, n),
                field(r, "correct" + suffix, path, n),
                field(r, "incorrect" + suffix, path, n),
            )
            for n, r in rows
        ]
    raise GrainsError(f"{Path(path).name} is not an A/B data set; fix: pass CAA A/B JSON or the 2-choice MMLU file")


def load_dolly(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, responses): the instruction, with its context when there is one, and the reference."""
    prompts, responses = [], []
    for number, row in read_rows(path):
        instruction = field(row, "instruction", path, number)
        context = "" if row.get("context") is None else row["context"]  # optional: missing, null or text
        if not isinstance(context, str):
            raise GrainsError(
                f"{where(path, number)}: 'context' is {kind_of(context)}, not text; fix: make it a string or drop it"
            )
        if context.strip():
            instruction = f"{instruction}\n\n{checked_text(context, 'context', path, number)}"
        prompts.append(instruction)
        responses.append(field(row, "response", path, number))
    return prompts, responses


def check_limit(limit: int | None, option: str = "--limit") -> None:
    """A --limit is None (no limit) or a count of at least 1."""
    if limit is not None and limit < 1:
        raise GrainsError(f"{option} must be at least 1 (got {limit}); fix: pass a positive count, or leave it out")


def split(items: Sequence[T], key: Callable[[T], str], validation_fraction: float = 0.3) -> tuple[list[T], list[T]]:
    """(train, validation), decided per item by the SHA-256 of key(item): stable across runs and files."""
    train, validation = [], []
    for item in items:
        digest = int(hashlib.sha256(key(item).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (validation if digest < validation_fraction else train).append(item)
    return train, validation


def select(
    items: Sequence[T], part: str, key: Callable[[T], str], limit: int | None = None, source: str = "the data"
) -> list[T]:
    """The items of one split: 70 % train, 30 % validation, the validation halved into tune and report.
    No items left is a GrainsError naming `source`."""
    chosen = items
    if part != "all":
        train, validation = split(items, key)
        report, tune = split(validation, lambda item: "tune/" + key(item), validation_fraction=0.5)
        parts = {"train": train, "validation": validation, "tune": tune, "report": report, "train+tune": train + tune}
        chosen = parts[part]
    if not chosen:
        raise GrainsError(
            f"the '{part}' split of {source} has no items ({len(items)} in all); fix: add items or pass --split all"
        )
    return list(chosen[:limit] if limit is not None else chosen)
