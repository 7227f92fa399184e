from __future__ import annotations

import bench_prefill  # noqa: E402
import numpy as np

from grains_edge.runtime.engine import Engine  # noqa: E402


def test_both_settings_give_the_same_last_logits_and_cache(tiny_export):
    engine = Engine(tiny_export, device="cpu")
    ids = list(range(3, 40))
    _, last, last_cache = bench_prefill.prompt_step(engine, ids, 1)
    _, every, every_cache = bench_prefill.prompt_step(engine, ids, 0)
    np.testing.assert_allclose(last, every, rtol=1e-5, atol=1e-5)
    assert last_cache.length == every_cache.length == len(ids)
    for a, b in zip(last_cache.buffers, every_cache.buffers, strict=True):
        filled = slice(0, len(ids))  # [batch, kv_heads, capacity, head_dim]: past the prompt is unwritten
        np.testing.assert_array_equal(a.numpy()[:, :, filled], b.numpy()[:, :, filled])
