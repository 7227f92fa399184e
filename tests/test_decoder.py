"""The export decoder recomputes the Hugging Face forward pass exactly, with steering and a KV cache."""

import pytest
import torch

from grains_edge.export.decoder import SteeredDecoder
from grains_edge.steering import steering_hooks
from tests.conftest import tiny_model


def empty_cache(decoder: SteeredDecoder, batch: int):
    shape = (batch, decoder.num_kv_heads, 0, decoder.head_dim)
    return [torch.zeros(shape) for _ in range(2 * decoder.num_layers)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_hugging_face_with_per_row_steering_and_left_padding(arch):
    model = tiny_model(arch, 128)
    decoder = SteeredDecoder(model, [1, 2])
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    steering = torch.zeros(2, 4, 64)
    steering[0, 1] = torch.randn(64) * 4
    steering[1, 2] = torch.randn(64) * 4
    with torch.no_grad():
        ours = decoder(ids, mask, positions, steering, *empty_cache(decoder, 2))[0]
        with steering_hooks(model, steering, [1, 2]):
            reference = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_steps_equal_the_full_sequence(arch):
    model = tiny_model(arch, 128)
    decoder = SteeredDecoder(model, [0, 3])
    ids = torch.randint(0, 128, (1, 6))
    steering = torch.randn(1, 4, 64) * 3
    with torch.no_grad():
        full = decoder(ids, torch.ones(1, 6, dtype=torch.long), torch.arange(6)[None], steering, *empty_cache(decoder, 1))
        cache = empty_cache(decoder, 1)
        steps = []
        for t in range(6):
            logits, *cache = decoder(
                ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), steering, *cache
            )
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[0], atol=1e-5, rtol=1e-5)
