"""The data formats grains-edge reads, as contrastive pairs and evaluation items.

  * TruthfulQA multiple choice JSON: [{question, mc1_targets: {answer: 0|1}, mc2_targets: {...}}]
  * CAA A/B JSON: [{question (with "Choices: (A) … (B) …"), answer_matching_behavior,
    answer_not_matching_behavior}], the matching answer being the behaviour to steer toward
  * 2-choice MMLU (CAA test format): [{prompt, correct, incorrect, correct_full_text, …}]
  * Dolly JSONL: {instruction, context, response}
  * plain JSONL of {"prompt", "preferred", "dispreferred"} for a user's own behaviour
A malformed row is a GrainsError naming the file, the row and the fix. Splits are deterministic:
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
from grains_edge.evaluation import ABItem, MCItem

T = TypeVar("T")
CHOICE = re.compile(r"^\(([A-Z])\)\s*(.*?)\s*$")


@dataclass
class Pair:
    prompt: str
    preferred: str
    dispreferred: str


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSON list or a JSONL file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GrainsError(f"data file not found: {path}; fix: pass an existing .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise GrainsError(
                        f"{path.name} row {number}: not JSON ({error}); fix: one object per line"
                    ) from None
        return rows
    try:
        rows = json.loads(text)
    except ValueError as error:
        raise GrainsError(f"{path.name}: not valid JSON ({error}); fix: a JSON list of objects") from None
    if not isinstance(rows, list):
        raise GrainsError(f"{path.name}: expected a JSON list of objects; fix: wrap the rows in [ … ]")
    return rows


def field(row, name: str, path: Path | str, number: int) -> str:
    value = row.get(name) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise GrainsError(f"{Path(path).name} row {number}: missing text field '{name}'; fix: add it to the row")
    return value


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


def detect_format(rows: list[dict]) -> str:
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
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
        "unknown data format; fix: use TruthfulQA MC JSON, CAA A/B JSON, or JSONL of {prompt, preferred, dispreferred}"
    )


def load_pairs(
    path: str | Path, score: str = "text", false_per_question: int = 1, toward: str = "matching"
) -> list[Pair]:
    """Contrastive pairs from any supported format. TruthfulQA: the true MC1 answer against the first
    `false_per_question` false ones. CAA: the matching answer as its option text ("text") or letter."""
    rows = read_rows(path)
    kind = detect_format(rows)
    pairs: list[Pair] = []
    for number, row in enumerate(rows, 1):
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
    return pairs


def mc_item(row, key: str, path, number: int) -> MCItem:
    targets = row.get(key) if isinstance(row, dict) else None
    if not isinstance(targets, dict) or not targets or 1 not in targets.values():
        raise GrainsError(f"{Path(path).name} row {number}: '{key}' needs {{answer: 0|1}} with a true answer; fix it")
    return MCItem(field(row, "question", path, number), list(targets), [int(v) for v in targets.values()])


def load_truthfulqa(path: str | Path) -> tuple[list[MCItem], list[MCItem]]:
    """(MC1 items, MC2 items) in file order."""
    rows = read_rows(path)
    if detect_format(rows) != "truthfulqa":
        raise GrainsError(f"{Path(path).name} is not TruthfulQA MC JSON; fix: pass mc_task-style data")
    mc1 = [mc_item(row, "mc1_targets", path, n) for n, row in enumerate(rows, 1)]
    mc2 = [mc_item(row, "mc2_targets", path, n) for n, row in enumerate(rows, 1)]
    return mc1, mc2


def ab_item(row, path, number: int, score: str, toward: str = "matching") -> ABItem:
    """The A/B item with `matching` = the answer to steer toward: the behaviour-matching one, or with
    toward="not-matching" the other (for behaviours to steer away from, like sycophancy)."""
    item = ab_item_matching(row, path, number, score)
    return item if toward == "matching" else ABItem(item.question, item.other, item.matching)


def ab_item_matching(row, path, number: int, score: str) -> ABItem:
    question = field(row, "question", path, number)
    matching = field(row, "answer_matching_behavior", path, number)
    other = field(row, "answer_not_matching_behavior", path, number)
    if score == "letter":
        return ABItem(question, matching.strip(), other.strip())
    options = option_texts(question)
    if letter(matching) not in options or letter(other) not in options:
        raise GrainsError(
            f"{Path(path).name} row {number}: cannot find the (A)/(B) option texts; fix: use --score letter"
        )
    return ABItem(question, options[letter(matching)], options[letter(other)])


def load_ab(path: str | Path, score: str = "text", toward: str = "matching") -> list[ABItem]:
    """CAA A/B items (matching = the behaviour) or 2-choice MMLU items (matching = the correct answer)."""
    rows = read_rows(path)
    kind = detect_format(rows)
    if kind == "caa":
        return [ab_item(row, path, n, score, toward) for n, row in enumerate(rows, 1)]
    if kind == "mmlu":
        suffix = "" if score == "letter" else "_full_text"
        return [
            ABItem(
                field(r, "prompt", path, n),
                field(r, "correct" + suffix, path, n),
                field(r, "incorrect" + suffix, path, n),
            )
            for n, r in enumerate(rows, 1)
        ]
    raise GrainsError(f"{Path(path).name} is not an A/B data set; fix: pass CAA A/B JSON or the 2-choice MMLU file")


def load_dolly(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, responses): the instruction, with its context when there is one, and the reference."""
    prompts, responses = [], []
    for number, row in enumerate(read_rows(path), 1):
        instruction = field(row, "instruction", path, number)
        context = row.get("context") or ""
        prompts.append(f"{instruction}\n\n{context}" if context.strip() else instruction)
        responses.append(field(row, "response", path, number))
    return prompts, responses


def split(items: Sequence[T], key: Callable[[T], str], validation_fraction: float = 0.3) -> tuple[list[T], list[T]]:
    """(train, validation), decided per item by the SHA-256 of key(item): stable across runs and files."""
    train, validation = [], []
    for item in items:
        digest = int(hashlib.sha256(key(item).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (validation if digest < validation_fraction else train).append(item)
    return train, validation
