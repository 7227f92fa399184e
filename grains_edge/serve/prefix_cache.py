"""The KV of earlier rows, kept so that a request starting the same way skips recomputing it.

A row's keys and values at position p depend only on its tokens 0..p and its steering (attention is causal,
and the steering vector is added at every position alike), so a request whose first r tokens and steering
equal a finished row's can copy that row's first r positions into its slot and run only the rest. Chat
requests share the chat template's system turn; a client's next turn resends the whole conversation, whose
KV its previous answer already holds. Entries are whole rows (prompt + answer), least recently used first
out once their bytes pass the budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def steering_key(steering: np.ndarray | None) -> bytes:
    """Which steering a row ran with, as a short digest of its vector [layers, hidden] (None: unsteered)."""
    if steering is None:
        return b"unsteered"
    return hashlib.blake2b(np.ascontiguousarray(steering).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Entry:
    key: bytes
    tokens: np.ndarray  # [n] int64
    kv: list[np.ndarray]  # per past input: [kv_heads, n, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.kv)

    def shared(self, tokens: np.ndarray) -> int:
        """How many leading tokens this entry and `tokens` have in common."""
        count = min(len(self.tokens), len(tokens))
        differ = np.flatnonzero(self.tokens[:count] != tokens[:count])
        return int(differ[0]) if len(differ) else count


class PrefixCache:
    """Rows' KV by (steering, tokens), within `budget` bytes; `longest` finds the most a prompt can reuse."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest use first
        self.nbytes = 0
        self.reused_tokens = 0  # prompt tokens served from the cache since start

    def longest(self, key: bytes, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest start with `prompt` under the same steering, and that length; at most
        len(prompt) - 1, since the prompt's last token must run to give the first answer token's logits."""
        tokens = np.asarray(prompt, np.int64)[:-1]
        best, length = None, 0
        for entry in self.entries.values():
            if entry.key == key:
                shared = entry.shared(tokens)
                if shared > length:
                    best, length = entry, shared
        if best is not None:
            self.entries.move_to_end(id(best))
        return best, length

    def store(self, key: bytes, tokens: list[int], kv: list[np.ndarray]) -> None:
        """Keep a finished row's KV (copies, [kv_heads, len(tokens), head_dim] each); entries it extends go."""
        entry = Entry(key, np.asarray(tokens, np.int64), kv)
        if len(entry.tokens) == 0 or entry.nbytes > self.budget:
            return
        for other in list(self.entries.values()):
            if other.key != key:
                continue
            shared = other.shared(entry.tokens)
            if shared == len(entry.tokens):  # already held by a longer row
                self.entries.move_to_end(id(other))
                return
            if shared == len(other.tokens):  # the new row extends it
                self.remove(other)
        self.entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self.remove(next(iter(self.entries.values())))

    def remove(self, entry: Entry) -> None:
        del self.entries[id(entry)]
        self.nbytes -= entry.nbytes

    def counts(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.nbytes, "reused_tokens": self.reused_tokens}
