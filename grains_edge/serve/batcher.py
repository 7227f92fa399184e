"""Continuous batching: one thread runs the engine's session for every request at once.

Each loop turn: drop cancelled rows, admit waiting requests into free slots (the newcomers' prompts run
together, each row on its own slot, after whatever start of it the prefix cache holds; each yields its
first token), then one decode step for all active rows together, each with its own steering row, KV slot
and position. A row leaves when it ends (stop token, stop string, max_tokens) or is cancelled, its KV goes
to the prefix cache, and its slot to the next request at once. A step of k rows reads the weights once, not
k times, which is what batching saves (most for float32 weights, whose steps are bandwidth-bound).

Requests wait in a bounded queue; `submit` refuses one when it is full (the HTTP layer answers 429).
Events reach a request through its `emit` callback, called on the batcher thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.prompts import held_back, stop_at
from grains_edge.runtime.engine import Engine, pick_token, seen_tokens
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.runtime.tokenizer import TextStream
from grains_edge.serve.prefix_cache import PrefixCache, steering_key
from grains_edge.serve.slots import SlotCache, prompt_groups


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Finished | Failed


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass(eq=False)
class Job:
    """One request's generation: its inputs, where its events go, and its progress."""

    prompt_ids: list[int]
    steering: np.ndarray | None  # [layers, hidden]; None = unsteered
    settings: GenerationSettings
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    number: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    answer: TextStream | None = None  # the generated tokens' text, from admission on
    shown: int = 0  # characters of the decoded text already emitted
    done: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    @cached_property
    def steering_key(self) -> bytes:
        return steering_key(self.steering)


class Batcher:
    """The scheduler over one engine: `submit` jobs from any thread, `start` the loop, `close` it."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        capacity: int,
        max_queue: int,
        on_logits: Callable[[Job, int, np.ndarray], None] | None = None,
        prefix_cache: int = 0,
    ):
        self.engine = engine
        self.slots = SlotCache(engine, max_batch, capacity)
        self.prefixes = PrefixCache(prefix_cache)  # bytes of finished rows' KV kept for reuse; 0: none
        self.max_queue = max_queue
        self.on_logits = on_logits  # a debug hook: (job, step, logits [vocab]) before each token is picked
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []  # active[i] decodes in slot i
        self.state: dict[Job, tuple[np.random.Generator, np.ndarray]] = {}  # rng and seen tokens [vocab]
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.run, name="grains-edge-batcher", daemon=True)

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when `max_queue` jobs already wait beyond the free slots."""
        with self.condition:
            if any(waiting.cancelled.is_set() for waiting in self.pending):  # clients that gave up waiting
                self.pending = deque(waiting for waiting in self.pending if not waiting.cancelled.is_set())
            free = self.slots.max_batch - len(self.active)
            if len(self.pending) >= self.max_queue + free:
                raise QueueFull(f"{len(self.pending)} requests are waiting")
            self.pending.append(job)
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job` at the next step; wake the loop so a waiting job can take the slot."""
        job.cancel()
        with self.condition:
            self.condition.notify()

    def counts(self) -> dict[str, int]:
        return {
            "active": len(self.active),
            "queued": len(self.pending),
            "max_batch": self.slots.max_batch,
            "prefix_cache": self.prefixes.counts(),
        }

    # ---- the loop (batcher thread only) ------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not self.pending and not self.active:
                    self.condition.wait()
                if self.closed:
                    break
            try:
                self.turn()
            except Exception as error:  # the session failed: every row in flight fails, the server goes on
                for job in list(self.active):
                    self.finish(job, Failed(f"generation failed ({error}); fix: retry the request"))
        for job in [*self.active, *self.pending]:
            job.emit(Failed("the server is shutting down; fix: retry later"))

    def turn(self) -> None:
        for job in [job for job in self.active if job.cancelled.is_set()]:
            self.release(job)
        newcomers: list[Job] = []
        with self.condition:
            while self.pending and len(self.active) + len(newcomers) < self.slots.max_batch:
                job = self.pending.popleft()
                if not job.cancelled.is_set():
                    newcomers.append(job)
        if newcomers:
            self.admit(newcomers)
        if self.active:
            steps = self.slots.decode(np.array([job.generated[-1] for job in self.active], np.int64))
            for job, logits in zip(list(self.active), steps, strict=True):
                self.advance(job, logits)

    def admit(self, jobs: list[Job]) -> None:
        """Run the newcomers' prompts on the next free slots: one that continues a cached prefix alone, the rest
        together (`prompt_groups`); each yields its first token."""
        found = [self.prefixes.longest(job.steering_key, job.prompt_ids) for job in jobs]
        lengths = [len(job.prompt_ids) for job in jobs]
        for rows, past in prompt_groups(lengths, [count for _, count in found]):
            group = [jobs[row] for row in rows]
            first = len(self.active)
            if past:
                self.slots.restore(first, found[rows[0]][0].kv, past)
            steerings = np.stack(  # [n, layers, hidden]
                [job.steering if job.steering is not None else self.engine.zero_steering() for job in group]
            )
            try:
                logits = self.slots.prompts(first, [job.prompt_ids for job in group], steerings, past)
            except Exception as error:  # these requests fail alone: their slots were not taken yet
                for job in group:
                    job.emit(Failed(f"the prompt step failed ({error}); fix: retry the request"))
                continue
            self.prefixes.reused_tokens += past
            self.active.extend(group)
            for job in group:
                seen = seen_tokens(job.prompt_ids, self.engine.manifest.vocab_size)
                self.state[job] = (np.random.default_rng(job.settings.seed), seen)
                job.answer = self.engine.tokenizer.stream()
            for job, row_logits in zip(group, logits, strict=True):
                self.advance(job, row_logits)

    def advance(self, job: Job, logits: np.ndarray) -> None:
        """Pick the row's next token from its logits [vocab] and emit what it adds to the text."""
        if self.on_logits is not None:
            self.on_logits(job, len(job.generated), logits)
        rng, seen = self.state[job]
        try:
            token = pick_token(logits, job.settings, rng, seen)
        except GrainsError as error:  # this row's logits only: the other rows go on
            self.finish(job, Failed(str(error)))
            return
        if token in self.engine.stop_ids and not job.ignore_eos:
            self.finish(job, self.finished(job, "stop"))
            return
        job.generated.append(token)
        seen[token] = True
        text = job.answer.add(token)
        end = stop_at(text, job.stop, job.shown)
        if end is not None:
            self.show(job, text[:end])
            self.finish(job, self.finished(job, "stop"))
            return
        slot_full = self.slots.lengths[self.active.index(job)] >= self.capacity  # no room to feed this token
        if len(job.generated) >= job.settings.max_new_tokens or slot_full:
            self.show(job, text)
            self.finish(job, self.finished(job, "length"))
        else:
            self.show(job, text[: len(text) - held_back(text, job.stop)])

    def show(self, job: Job, text: str) -> None:
        if len(text) > job.shown:
            job.emit(Piece(text[job.shown :]))
            job.shown = len(text)

    def finished(self, job: Job, reason: str) -> Finished:
        return Finished(reason, len(job.prompt_ids), len(job.generated))

    def finish(self, job: Job, event: Event) -> None:
        job.done = True
        job.emit(event)
        self.release(job, keep=not isinstance(event, Failed))

    def release(self, job: Job, keep: bool = True) -> None:
        """Take the row out of the batch: the last row moves into its slot, so slots 0..k-1 stay packed; with
        `keep`, its KV goes to the prefix cache first."""
        slot = self.active.index(job)
        if keep and self.prefixes.budget:
            kept = int(self.slots.lengths[slot])  # prompt + answer tokens fed so far
            self.prefixes.store(job.steering_key, (job.prompt_ids + job.generated)[:kept], self.slots.saved(slot))
        last = len(self.active) - 1
        if slot != last:
            self.slots.move(last, slot)
            self.active[slot] = self.active[last]
        self.active.pop()
        self.slots.clear(last)
        self.state.pop(job, None)
