import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grains_edge.steer.attribution import answer_logprob, contrastive, integrated_gradients, path
from tests.conftest import tiny_model


def smooth_llama():
    """A tiny Llama whose RMSNorm eps is large, so the path from the zero embedding is smooth and a
    Riemann sum converges (with the usual tiny eps the norm is singular at zero; see the module doc)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1.0,
    )
    model = LlamaForCausalLM(config).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


PROMPT, ANSWER, OTHER = [3, 9, 12, 5, 60, 61], [7, 21, 30], [40, 2]
TEMPLATE = (2, 1)  # PROMPT[:2] and PROMPT[-1:] are chat template


def brute_force(model, steps, alphas, weights, template=(0, 0)):
    """IG one point at a time on the full sequence (no batch, no cache): sum_k w_k grad F(x' + a_k (x - x'))."""
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(torch.tensor([PROMPT + ANSWER]))[0]
    held = torch.zeros(len(PROMPT + ANSWER), 1)
    held[: template[0]] = 1.0
    held[len(PROMPT) - template[1] : len(PROMPT)] = 1.0
    baseline = embeddings * held
    total = torch.zeros_like(embeddings)
    for alpha, weight in zip(alphas.tolist(), weights.tolist(), strict=True):
        point = (baseline + alpha * (embeddings - baseline))[None].clone().requires_grad_(True)
        answer_logprob(model, point, len(PROMPT), torch.tensor(ANSWER)).sum().backward()
        total += weight * point.grad[0]
    return ((embeddings - baseline) * total).sum(-1)


def test_path_weights_integrate_constants_exactly_and_a_line_closely():
    alphas, weights = path(8)
    assert abs(weights.sum().item() - 1.0) < 1e-6 and abs((weights * alphas).sum().item() - 0.5) < 1e-2


def test_completeness_scores_sum_to_the_objective_change():
    for template in ((0, 0), TEMPLATE):
        result = integrated_gradients(smooth_llama(), PROMPT, ANSWER, steps=64, template=template)
        change = result.objective - result.baseline
        assert abs(result.scores.sum().item() - change) < 0.01 * abs(change)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_cached_steps_equal_a_brute_force_loop_with_the_same_points(arch):
    model = smooth_llama() if arch == "llama" else tiny_model("gpt2", 64)
    result = integrated_gradients(model, PROMPT, ANSWER, steps=6, template=TEMPLATE)
    expected = brute_force(model, 6, *path(6), template=TEMPLATE)
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=1e-4)


def test_twenty_warped_steps_match_a_fine_plain_riemann_sum():
    model = smooth_llama()
    steps = 200
    fine = brute_force(model, steps, (torch.arange(steps) + 0.5) / steps, torch.full((steps,), 1 / steps))
    torch.testing.assert_close(integrated_gradients(model, PROMPT, ANSWER).scores, fine, atol=0.02, rtol=0.02)


def test_template_tokens_are_held_and_score_zero():
    result = integrated_gradients(smooth_llama(), PROMPT, ANSWER, steps=8, template=TEMPLATE)
    assert result.scores[:2].eq(0).all() and result.scores[len(PROMPT) - 1] == 0
    assert result.scores[2 : len(PROMPT) - 1].ne(0).all() and result.scores[len(PROMPT) : -1].ne(0).all()
    assert result.scores[-1] == 0  # the last token predicts nothing in the answer


def test_bfloat16_autocast_ranks_tokens_like_float32():
    model = smooth_llama()
    exact = integrated_gradients(model, PROMPT, ANSWER, steps=8)
    fast = integrated_gradients(model, PROMPT, ANSWER, steps=8, bfloat16=True)
    assert fast.scores.dtype == torch.float32
    assert torch.corrcoef(torch.stack([exact.scores, fast.scores]))[0, 1] > 0.98


def test_contrastive_signs():
    positive, negative = contrastive(smooth_llama(), PROMPT, ANSWER, OTHER, steps=16)
    assert positive.objective < 0 < negative.objective  # +log p(pref) and -log p(dispref)
    assert len(positive.scores) == len(PROMPT + ANSWER) and len(negative.scores) == len(PROMPT + OTHER)


@pytest.mark.slow
def test_real_model_content_attribution_is_complete_and_skips_the_template():
    """On SmolLM2 the template-held baseline makes 20 steps add up (an all-zero baseline does not)."""
    from grains_edge.evaluate.datasets import Pair
    from grains_edge.model import sources
    from grains_edge.steer.vectors import tokenize_pairs

    model, tokenizer = sources.load("default")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    (pair,) = tokenize_pairs(tokenizer, [Pair("Is the sky green?", "No, the sky is blue.", "Yes, the sky is green.")])
    assert tokenizer.decode(pair.prompt[: pair.template[0]]).endswith("<|im_start|>user\n")
    positive, negative = contrastive(model, *pair[:3], template=pair.template)
    for result in (positive, negative):
        change = result.objective - result.baseline
        assert abs(result.scores.sum().item() - change) < 0.2 * abs(change)
        assert result.scores[: pair.template[0]].eq(0).all()
