import torch

from grains_edge.model.hooks import renormalized_add, steering_hooks
from tests.conftest import tiny_model


def test_renormalized_add_keeps_each_token_norm():
    hidden = torch.randn(2, 5, 16)
    shift = torch.randn(2, 16) * 10
    out = renormalized_add(hidden, shift)
    torch.testing.assert_close(out.norm(dim=-1), hidden.norm(dim=-1))
    direction = torch.nn.functional.cosine_similarity(out - hidden, shift[:, None, :].expand_as(hidden), dim=-1)
    assert (direction > 0).all()


def test_zero_shift_is_identity():
    hidden = torch.randn(1, 3, 8)
    torch.testing.assert_close(renormalized_add(hidden, torch.zeros(1, 8)), hidden)


def test_hooks_are_removed_after_the_block():
    model = tiny_model("llama", 64)
    ids = torch.randint(0, 64, (1, 6))
    steering = torch.randn(1, 4, 64) * 5
    with torch.no_grad():
        before = model(ids).logits
        with steering_hooks(model, steering):
            during = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after)
