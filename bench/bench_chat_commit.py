"""What storing every streamed piece in its own commit costs the chat, on the real engine, paired in one run.

Three ways to consume the same greedy reply (same prompt, up to `--tokens` new tokens: a story, so EOS
comes later):
  none          the pieces are only joined in memory (what showing without storing would cost)
  commit        each piece appended to its message row in its own WAL commit, synchronous=NORMAL:
                the chat's StoredReply.add (survives a killed process, not a power cut)
  commit-fsync  the same with synchronous=FULL: an fsync per piece (would survive a power cut too)
The modes run round after round in rotating order in one process, so the machine's drift hits them
alike; reported are each mode's median tokens/s (first piece to last, consumer included), the median of
the per-round ratios to `none`, and the mean time of one commit.

    python bench/bench_chat_commit.py [--rounds 10] [--tokens 64] [--export DIR] [--out bench/results/chat_commit.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from report import machine, publish

MODES = ("none", "commit", "commit-fsync")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class Timed:
    """A piece consumer that keeps the text, optionally stores it, and times the reply and its commits."""

    def __init__(self, reply=None):
        self.reply = reply  # a StoredReply, or None: memory only
        self.text = ""
        self.first = self.last = 0.0
        self.pieces = 0
        self.commit_seconds = 0.0

    def __call__(self, index: int, piece: str) -> None:
        if self.reply is not None:
            started = time.perf_counter()
            self.reply.add(piece)
            self.commit_seconds += time.perf_counter() - started
        self.text += piece
        self.last = time.perf_counter()
        if not self.pieces:
            self.first = self.last
        self.pieces += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--export", type=Path, default=None, help="an export folder (default: the default model's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from grains_edge.runtime.bootstrap import ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.runtime.protocol import GenerationSettings
    from grains_edge.store.conversations import open_store
    from grains_edge.tui.generation import StoredReply, interleave

    engine = Engine(args.export or ensure_export("default"))
    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0)
    ids = engine.chat_ids([{"role": "user", "content": PROMPT}])
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    commits: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}
    with tempfile.TemporaryDirectory() as folder:
        stores = {}
        for mode in MODES[1:]:
            store, _ = open_store(Path(folder) / f"{mode}.sqlite3")
            store._db.execute(f"PRAGMA synchronous={'FULL' if mode == 'commit-fsync' else 'NORMAL'}")
            stores[mode] = (store, store.create_conversation("bench").id)
        interleave(engine, ids, [None], settings, threading.Event(), Timed())  # warm-up
        for round_number in range(args.rounds):
            shift = round_number % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                reply = None
                if mode != "none":
                    store, conversation = stores[mode]
                    reply = StoredReply(store, store.add_message(conversation, "assistant", complete=False))
                consumer = Timed(reply)
                interleave(engine, ids, [None], settings, threading.Event(), consumer)
                rates[mode].append((consumer.pieces - 1) / (consumer.last - consumer.first))
                if reply is not None:
                    reply.finish()
                    commits[mode].append(consumer.commit_seconds / consumer.pieces)
    ratios = {mode: [rate / base for rate, base in zip(rates[mode], rates["none"], strict=True)] for mode in MODES[1:]}
    result = {
        "bench": "chat_commit",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "tokens": args.tokens,
        "pieces_per_reply": consumer.pieces,
        "tokens_per_second_median": {mode: statistics.median(values) for mode, values in rates.items()},
        "ratio_to_none_median": {mode: statistics.median(values) for mode, values in ratios.items()},
        "commit_ms_mean": {mode: 1000 * statistics.mean(values) for mode, values in commits.items()},
        "tokens_per_second": rates,
    }
    publish(result, args.out)


if __name__ == "__main__":
    main()
