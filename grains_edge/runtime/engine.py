"""The ONNX Runtime engine: one loaded steered graph, a new steering tensor on every call.

The KV cache stays inside ONNX Runtime between decode steps: one pre-allocated buffer per layer and
kind, bound through IOBinding as both `past_key_values.*` and `present.*`, which the graph's
GroupQueryAttention appends to in place (no per-step copy, no per-step rebinding). The
steering tensor [batch, num_layers, hidden] is just another input, so switching a behaviour
profile is an array assignment: the session is never rebuilt.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grains_edge import kernels
from grains_edge.devices import choose_providers, device_notice
from grains_edge.errors import GrainsError
from grains_edge.export.graph_io import ALL_POSITIONS, LAST_POSITION
from grains_edge.export.manifest import MODEL_NAME, Manifest, graph_mismatches
from grains_edge.prompts import PLAIN_TURN_STOPS, has_chat_template, held_back, stop_at
from grains_edge.runtime.protocol import GenerationSettings, GenerationStats
from grains_edge.runtime.tokenizer import ChatTokenizer

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass
class Cache:
    """KV buffers [batch, kv_heads, capacity, head_dim], bound as both `past_key_values.*` and `present.*`:
    GroupQueryAttention appends each step's keys and values in place, so a step copies no cache."""

    binding: object  # onnxruntime IOBinding with the buffers bound
    buffers: list  # OrtValues, in input-name order
    capacity: int
    length: int = 0  # tokens already in the cache
    # decode steps (one token per row) write into these bound arrays instead of re-binding
    token: np.ndarray | None = None  # [batch, 1]
    position: np.ndarray | None = None  # [batch, 1]
    logits: np.ndarray | None = None  # [batch, 1, vocab]
    ones: np.ndarray | None = None  # [batch * capacity], the prompt steps' attention mask storage
    # decode steps' attention mask [batch, capacity]: 1 for the cached tokens, 0 after; a shape that never
    # changes lets ONNX Runtime reuse one allocation plan for every decode step
    mask: np.ndarray | None = None
    bound: list = field(default_factory=list)  # OrtValues viewing the arrays above, kept alive here
    decode_bound: bool = False
    steering: np.ndarray | None = None  # the array currently bound as `steering`


def open_session(export_dir: Path, manifest: Manifest, options, providers: list[str]):
    """The export's ONNX Runtime session; a damaged graph, or one its manifest does not describe, is a
    GrainsError."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    # every error ONNX Runtime raises while loading (InvalidProtobuf, NoSuchFile, Fail, InvalidGraph, …)
    errors = tuple(v for v in vars(ort_state).values() if isinstance(v, type) and issubclass(v, Exception))
    try:
        session = ort.InferenceSession(str(export_dir / MODEL_NAME), options, providers=providers)
    except errors as error:
        reason = str(error).splitlines()[0][:300]
        raise GrainsError(
            f"{export_dir}/{MODEL_NAME} cannot be loaded ({type(error).__name__}: {reason}); "
            "fix: re-run 'grains-edge export' (a copy or download may have been cut short)"
        ) from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    mismatches = graph_mismatches(manifest, inputs, outputs)
    if mismatches:
        raise GrainsError(
            f"{export_dir}/manifest.json does not describe its graph ({'; '.join(mismatches[:2])}); "
            "fix: re-run 'grains-edge export'"
        )
    return session


class Engine:
    """Generate and score with a steered ONNX export. `steering` is [num_layers, hidden] or batched."""

    def __init__(self, export_dir: str | Path, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.export_dir = Path(export_dir).expanduser()
        self.manifest = Manifest.load(self.export_dir)
        available = ort.get_available_providers()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.manifest.kernels == "fused":
            try:
                kernels.register(options)
            except kernels.KernelsUnavailable as error:
                raise GrainsError(f"{error}; or re-export {self.export_dir} with --kernels stock") from None
        providers = choose_providers(device, available)
        self.session = open_session(self.export_dir, self.manifest, options, providers)
        self.provider = self.session.get_providers()[0]
        notice = device_notice(device, available, self.provider, self.manifest.kernels)
        if notice:
            print(f"[grains-edge] {notice}", file=sys.stderr)
        # KV buffers live in host memory on either provider: ONNX Runtime's CUDA GroupQueryAttention takes
        # fp16/bf16 only, so in a float32 graph attention (and its cache) runs on the CPU provider.
        self.cache_device = "cpu"
        self.tokenizer = ChatTokenizer(self.export_dir)
        self.past_names = [n for n in self.manifest.input_names if n.startswith("past_key_values.")]
        self.present_names = self.manifest.output_names[1:]
        vocab = self.tokenizer.get_vocab()
        if vocab and max(vocab.values()) >= self.manifest.vocab_size:
            raise GrainsError(
                f"{self.export_dir}/tokenizer.json has token ids up to {max(vocab.values())}, the graph "
                f"{self.manifest.vocab_size}; fix: re-run 'grains-edge export'"
            )
        self.stop_ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            self.stop_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.last_stats = GenerationStats()
        self._ort = ort

    # ---- shapes ----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def zero_steering(self) -> np.ndarray:
        return np.zeros((self.num_layers, self.hidden_size), np.float32)  # [layers, hidden]

    def batched_steering(self, steering: np.ndarray | None, batch: int) -> np.ndarray:
        """None, [layers, hidden] or [batch, layers, hidden] -> contiguous float32 [batch, layers, hidden]."""
        if steering is None:
            return np.zeros((batch, self.num_layers, self.hidden_size), np.float32)
        steering = np.asarray(steering, np.float32)
        expected = (self.num_layers, self.hidden_size)
        if steering.shape[-2:] != expected or steering.ndim not in (2, 3):
            raise GrainsError(
                f"steering has shape {steering.shape}, this model needs {expected}; "
                "fix: use a profile built for this model"
            )
        if steering.ndim == 2:
            steering = np.broadcast_to(steering, (batch, *expected))
        return np.ascontiguousarray(steering)

    # ---- graph calls -----------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> Cache:
        """Pre-allocated KV buffers for `capacity` tokens, bound once for the whole generation."""
        shape = (batch, self.manifest.num_kv_heads, capacity, self.manifest.head_dim)
        buffers = [
            self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.cache_device)
            for _ in self.past_names
        ]
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        binding.bind_cpu_input("logits_to_keep", LAST_POSITION)
        for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        return Cache(
            binding,
            buffers,
            capacity,
            token=np.zeros((batch, 1), np.int64),
            position=np.zeros((batch, 1), np.int64),
            logits=np.zeros((batch, 1, self.manifest.vocab_size), np.float32),
            ones=np.ones(batch * capacity, np.int64),
            mask=np.zeros((batch, capacity), np.int64),
        )

    def step(self, input_ids: np.ndarray, steering: np.ndarray, cache: Cache) -> np.ndarray:
        """Run input_ids [batch, seq] after the cached tokens; returns the last position's logits [batch, vocab]."""
        batch, seq = input_ids.shape
        total = cache.length + seq
        if total > cache.capacity:
            raise GrainsError(f"KV cache holds {cache.capacity} tokens, {total} needed; fix: allocate a larger cache")
        binding = cache.binding
        if seq == 1:
            if not cache.decode_bound:
                cache.bound = [
                    self._ort.OrtValue.ortvalue_from_numpy(a)
                    for a in (cache.token, cache.position, cache.mask, cache.logits)
                ]
                binding.bind_ortvalue_input("input_ids", cache.bound[0])
                binding.bind_ortvalue_input("position_ids", cache.bound[1])
                binding.bind_ortvalue_input("attention_mask", cache.bound[2])
                binding.bind_ortvalue_output("logits", cache.bound[3])
                cache.decode_bound = True
            cache.token[:] = input_ids
            cache.position[:] = cache.length
            cache.mask[:, :total] = 1
        else:
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
            positions = np.arange(cache.length, total, dtype=np.int64)[None].repeat(batch, 0)
            binding.bind_cpu_input("position_ids", positions)
            binding.bind_output("logits", "cpu")  # a fresh output: its shape differs from the decode steps'
            binding.bind_input("attention_mask", "cpu", 0, np.int64, [batch, total], cache.ones.ctypes.data)
            cache.decode_bound = False
        if steering is not cache.steering:
            binding.bind_cpu_input("steering", steering)
            cache.steering = steering
        self.session.run_with_iobinding(binding)
        cache.length = total
        if cache.decode_bound:
            return cache.logits[:, -1].copy()
        return binding.get_outputs()[0].numpy()[:, -1]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, steering: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits [batch, seq, vocab] of right-padded input_ids [batch, seq] (attention_mask 1 = token)."""
        batch, seq = input_ids.shape
        if (np.diff(attention_mask, axis=1) > 0).any():
            raise GrainsError("forward() takes right-padded batches; fix: put the padding after the tokens")
        empty = np.zeros((batch, self.manifest.num_kv_heads, 0, self.manifest.head_dim), np.float32)
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
            "position_ids": np.arange(seq, dtype=np.int64)[None].repeat(batch, 0),
            "steering": self.batched_steering(steering, batch),
            "logits_to_keep": ALL_POSITIONS,
            **dict.fromkeys(self.past_names, empty),
        }
        return self.session.run(["logits"], feeds)[0]

    # ---- text ------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """Whether the model has its own chat template; without one, prompts are plain completion text."""
        return has_chat_template(self.tokenizer)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation under the chat template (else the plain prompt), ending with the
        assistant prompt."""
        return self.tokenizer.chat_ids(messages)

    def fit_context(self, prompt_ids: list[int], max_new_tokens: int) -> int:
        """Tokens that may still be generated; a prompt that leaves no room is a GrainsError."""
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise GrainsError(
                f"the prompt has {len(prompt_ids)} tokens, the model's context is {self.max_context}; "
                "fix: shorten the message or clear the conversation"
            )
        return min(max_new_tokens, room)

    def generate(
        self,
        prompt_ids: list[int],
        steering: np.ndarray | None = None,
        settings: GenerationSettings | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream decoded text pieces; stats of the finished run are in `self.last_stats`."""
        settings = settings or GenerationSettings()
        budget = self.fit_context(prompt_ids, settings.max_new_tokens)
        rng = np.random.default_rng(settings.seed)
        steer = self.batched_steering(steering, 1)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.last_stats = stats
        cache = self.new_cache(1, len(prompt_ids) + budget)
        generated: list[int] = []
        answer = self.tokenizer.stream()
        seen = seen_tokens(prompt_ids, self.manifest.vocab_size)
        shown = ""
        stops = () if self.has_chat_template else PLAIN_TURN_STOPS
        started = time.perf_counter()
        ids = np.asarray([prompt_ids], np.int64)
        stats.stopped_by = "length"
        for _ in range(budget):
            token = pick_token(self.step(ids, steer, cache)[0], settings, rng, seen)
            if not generated:
                stats.first_token_seconds = time.perf_counter() - started
                first_done = time.perf_counter()
            if token in self.stop_ids:
                stats.stopped_by = "eos"
                break
            generated.append(token)
            seen[token] = True
            stats.new_tokens = len(generated)
            checked = len(answer.text)
            text = answer.add(token)
            end = stop_at(text, stops, checked)
            if end is not None:
                yield text[len(shown) : end]
                stats.stopped_by = "eos"
                break
            text = text[: len(text) - held_back(text, stops)]
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
            if stop is not None and stop.is_set():
                stats.stopped_by = "user"
                break
            ids = np.asarray([[token]], np.int64)
        if generated:
            stats.decode_seconds = time.perf_counter() - first_done

    def chat(
        self,
        messages: Sequence[dict],
        steering: np.ndarray | None = None,
        settings: GenerationSettings | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        return self.generate(self.chat_ids(messages), steering, settings, stop)


def seen_tokens(prompt_ids: list[int], vocab_size: int) -> np.ndarray:
    """[vocab] bool, the tokens already in the context (what the repetition penalty discounts)."""
    seen = np.zeros(vocab_size, bool)
    seen[[i for i in prompt_ids if i < vocab_size]] = True
    return seen


def pick_token(
    logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator, seen: np.ndarray | None = None
) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling. With a repetition penalty p,
    the logits of the tokens marked in `seen` [vocab] are divided by p when positive and multiplied by
    p when negative first (Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor). Logits
    that are not all finite are a GrainsError: no token picked from them would mean anything."""
    if not np.isfinite(logits).all():
        raise GrainsError(
            "the model gave non-finite logits (NaN or infinity); fix: lower the steering's strength, or re-export "
            "the model if it happens unsteered"
        )
    if seen is not None and settings.repetition_penalty != 1.0:
        penalty = settings.repetition_penalty
        logits = logits.copy()
        hit = logits[seen]
        logits[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    if settings.temperature <= 0:
        return int(logits.argmax())
    # [vocab] unnormalized probabilities, the top one 1; the maximum taken first, so that a tiny temperature
    # gives exp(-inf) = 0, never inf - inf
    with np.errstate(over="ignore"):
        weights = np.exp((logits - logits.max()).astype(np.float32) / np.float32(settings.temperature))
    if settings.top_p >= 1.0:
        return draw(weights, rng)
    tokens = nucleus(weights, settings.top_p)
    return int(tokens[draw(weights[tokens], rng)])


DRAW_BLOCK = 256  # weights per block of `draw`'s two-level search


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability weights / their sum (inverse CDF): the block of 256 whose cumulative
    sum passes a uniform draw, then the index in it; cumulative sums of the whole vocabulary in float64 took
    0.2 ms a token."""
    whole = len(weights) // DRAW_BLOCK * DRAW_BLOCK
    sums = weights[:whole].reshape(-1, DRAW_BLOCK).sum(axis=1, dtype=np.float64)
    if whole < len(weights):
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    cumulative = np.cumsum(sums)  # [blocks]
    target = rng.random() * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, target, side="right")), len(sums) - 1)
    within = np.cumsum(weights[block * DRAW_BLOCK : (block + 1) * DRAW_BLOCK], dtype=np.float64)
    rest = target - (cumulative[block - 1] if block else 0.0)
    return block * DRAW_BLOCK + min(int(np.searchsorted(within, rest, side="right")), len(within) - 1)


NUCLEUS_FLOORS = (1e-2, 1e-4, 1e-8, 0.0)  # weight floors of the candidate sets, relative to the top token's


def nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """The top-p nucleus of `weights` [vocab] (unnormalized, the top one 1), most probable first: each token
    whose more probable tokens hold less than top_p of the mass (so at least the top one). Sorted among the
    tokens above a floor that hold top_p of the mass (they are a prefix of the sorted order, so they hold the
    nucleus), the floor lowered until they do: a full sort of the vocabulary took 3-4 ms a token."""
    target = top_p * weights.sum(dtype=np.float64)
    for floor in NUCLEUS_FLOORS:
        top = np.flatnonzero(weights >= floor)
        if weights[top].sum(dtype=np.float64) >= target:
            break
    top = top[np.argsort(-weights[top])]
    before = np.cumsum(weights[top], dtype=np.float64) - weights[top]  # mass of the more probable tokens
    return top[before < target]
