import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grains_edge.attribution import answer_logprob, contrastive, integrated_gradients


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


PROMPT, ANSWER, OTHER = [3, 9, 12, 5], [7, 21, 30], [40, 2]


def test_completeness_scores_sum_to_the_objective_change():
    result = integrated_gradients(smooth_llama(), PROMPT, ANSWER, steps=200)
    assert abs(result.scores.sum().item() - (result.objective - result.baseline)) < 0.01 * abs(result.objective)


def test_batched_steps_equal_a_brute_force_riemann_loop():
    model = smooth_llama()
    steps = 8
    result = integrated_gradients(model, PROMPT, ANSWER, steps=steps)
    embeddings = model.get_input_embeddings()(torch.tensor([PROMPT + ANSWER]))[0]
    total = torch.zeros_like(embeddings)
    for k in range(steps):
        point = ((k + 0.5) / steps * embeddings)[None].clone().requires_grad_(True)
        answer_logprob(model, point, len(PROMPT), torch.tensor(ANSWER)).sum().backward()
        total += point.grad[0] / steps
    torch.testing.assert_close(result.scores, (embeddings * total).sum(-1), atol=1e-5, rtol=1e-4)


def test_contrastive_signs():
    positive, negative = contrastive(smooth_llama(), PROMPT, ANSWER, OTHER, steps=16)
    assert positive.objective < 0 < negative.objective  # +log p(pref) and -log p(dispref)
    assert len(positive.scores) == len(PROMPT + ANSWER) and len(negative.scores) == len(PROMPT + OTHER)
