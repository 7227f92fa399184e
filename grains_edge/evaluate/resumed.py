"""Answer log-probabilities under many steerings, each pass resumed where its steering starts.

A frontier search scores the same sequences at dozens of steerings that leave every layer below their first
steered one untouched. The unsteered residual stream after each layer a search starts at is computed once;
a steered pass then runs only the layers from there on (the norm-preserving steering of `model.hooks`, the
rule the ONNX graph applies), and the output head only where an answer token is predicted. On the default
model a middle-layer pass costs about half a full one. A model whose decoder stack cannot be entered in the
middle (GPT-2 adds position embeddings to its input) is scored by full passes; the constructor tells which by
comparing the two on the first batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from grains_edge.model.hooks import decoder_layers, renormalized_add, steering_hooks


@dataclass
class Batch:
    ids: torch.Tensor  # [rows, width] right-padded: causal attention keeps padding out of every real token
    sequences: list[int]  # row -> index of the sequence
    starts: list[int]  # row -> position of the first answer token
    ends: list[int]  # row -> length of the sequence


def batches(sequences: Sequence[tuple[list[int], list[int]]], batch_tokens: int, pad_id: int) -> list[Batch]:
    """(prompt ids, answer ids) sequences sorted by length into right-padded batches of at most batch_tokens."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    result, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * sum(map(len, sequences[order[end]])) <= batch_tokens:
            end += 1
        rows = order[start:end]
        width = max(sum(map(len, sequences[i])) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for row, index in enumerate(rows):
            prompt, answer = sequences[index]
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        starts = [len(sequences[i][0]) for i in rows]
        result.append(Batch(ids, rows, starts, [len(sequences[i][0]) + len(sequences[i][1]) for i in rows]))
        start = end
    return result


class ResumedScorer:
    """Summed answer log-probabilities of fixed sequences under any steering [num_layers, hidden]."""

    def __init__(
        self,
        model,
        sequences: Sequence[tuple[list[int], list[int]]],
        start_layers: Iterable[int],
        batch_tokens: int = 1024,
        pad_id: int = 0,
    ):
        self.model = model
        self.blocks = decoder_layers(model)
        self.body = model.base_model
        self.batches = batches(sequences, batch_tokens, pad_id)
        self.count = len(sequences)
        # per start layer, per batch: the unsteered output of that decoder layer [rows, width, hidden]
        self.cache: dict[int, list[torch.Tensor]] = {layer: [] for layer in sorted(set(start_layers))}
        self.unsteered = self.full(None, capture=True)
        self.resumable = hasattr(self.body, "layers") and self.check_resume()

    def head_logprobs(self, hidden: torch.Tensor, batch: Batch, totals: np.ndarray) -> None:
        """Adds each row's summed answer log-probability to totals; hidden: final states [rows, width, hidden]."""
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        for row, (start, end) in enumerate(zip(batch.starts, batch.ends, strict=True)):
            logits = head(hidden[row, start - 1 : end - 1])  # [answer, vocab]: each predicts the next token
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            answer = batch.ids[row, start:end]
            totals[batch.sequences[row]] = float(
                torch.log_softmax(logits.double(), -1)[range(len(answer)), answer].sum()
            )

    def full(self, steering: np.ndarray | None, capture: bool = False) -> np.ndarray:
        """Log-probabilities by full passes with steering hooks; capture keeps the start layers' outputs."""
        totals = np.zeros(self.count)

        def keep(layer: int):
            def hook(_module, _args, output):
                self.cache[layer].append((output[0] if isinstance(output, tuple) else output).clone())

            return hook

        handles = [self.blocks[layer].register_forward_hook(keep(layer)) for layer in self.cache] if capture else []
        try:
            with torch.inference_mode(), self.hooks(steering, first=0):
                for batch in self.batches:
                    self.head_logprobs(self.body(input_ids=batch.ids).last_hidden_state, batch, totals)
        finally:
            for handle in handles:
                handle.remove()
        return totals

    def hooks(self, steering: np.ndarray | None, first: int):
        """Steering hooks on the steered layers from `first` on (none for None)."""
        layers = [] if steering is None else [i for i in np.flatnonzero(np.abs(steering).sum(-1)) if i >= first]
        tensor = torch.zeros(1, len(self.blocks), 1) if steering is None else torch.from_numpy(steering)[None]
        return steering_hooks(self.model, tensor, layers=[int(i) for i in layers])

    def resumed(
        self, steering: np.ndarray | None, start: int, batch_numbers: Sequence[int] | None = None
    ) -> np.ndarray:
        """Log-probabilities from the cached output of layer `start` on: steered there, then the layers above."""
        totals = np.zeros(self.count)
        everything = self.body.layers
        with torch.inference_mode(), self.hooks(steering, first=start + 1):  # hooked before the stack is cut
            self.body.layers = torch.nn.ModuleList(list(everything)[start + 1 :])
            try:
                for number in range(len(self.batches)) if batch_numbers is None else batch_numbers:
                    hidden = self.cache[start][number]  # [rows, width, hidden]
                    if steering is not None and np.abs(steering[start]).sum() > 0:
                        shift = torch.from_numpy(steering[start])[None].expand(len(hidden), -1)  # [rows, hidden]
                        hidden = renormalized_add(hidden, shift)
                    self.head_logprobs(self.body(inputs_embeds=hidden).last_hidden_state, self.batches[number], totals)
            finally:
                self.body.layers = everything
        return totals

    def check_resume(self) -> bool:
        """Whether entering the decoder stack at a cached layer reproduces the full pass (first batch)."""
        if not self.cache or not self.batches:
            return False
        rows = self.batches[0].sequences
        resumed = self.resumed(None, min(self.cache), [0])[rows]
        return bool(np.allclose(resumed, self.unsteered[rows], rtol=1e-4, atol=1e-3))

    def logprobs(self, steering: np.ndarray | None) -> np.ndarray:
        """Summed answer log-probability of every sequence [sequences] under `steering` (None: unsteered)."""
        steered = np.flatnonzero(np.abs(steering).sum(-1)) if steering is not None else []
        if not len(steered):
            return self.unsteered
        first = int(steered[0])
        if self.resumable and first in self.cache:
            return self.resumed(steering, first)
        return self.full(steering)
