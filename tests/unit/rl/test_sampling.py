"""The transformers engine's sampler: Gumbel-max over the warped scores draws what multinomial sampling draws."""

import torch

from r1cli.backends.hf_rollout import sampler
from r1cli.interfaces import SamplingParams


def _frequencies(params: SamplingParams, scores: torch.Tensor, draws: int = 40000) -> torch.Tensor:
    warp = sampler(params, torch.Generator().manual_seed(0))
    picks = warp(None, scores.expand(draws, -1).clone()).argmax(-1)
    return torch.bincount(picks, minlength=scores.shape[-1]).float() / draws


def _expected(scores: torch.Tensor, temperature: float, keep: list[int]) -> torch.Tensor:
    p = torch.zeros_like(scores)
    p[keep] = torch.softmax(scores[keep] / temperature, -1)
    return p


def test_gumbel_draws_follow_the_tempered_softmax_and_its_top_k_and_top_p_cuts():
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    # 40000 draws: a frequency's standard error is at most 0.0025
    full = _frequencies(SamplingParams(temperature=0.7), scores)
    torch.testing.assert_close(full, _expected(scores, 0.7, [0, 1, 2, 3, 4, 5]), rtol=0, atol=0.01)
    top_k = _frequencies(SamplingParams(temperature=1.0, top_k=3), scores)
    torch.testing.assert_close(top_k, _expected(scores, 1.0, [0, 1, 2]), rtol=0, atol=0.01)
    # top-p 0.8 at temperature 1: the probabilities 0.56, 0.21, 0.13, 0.08, ... keep the first three (0.89 >= 0.8)
    top_p = _frequencies(SamplingParams(temperature=1.0, top_p=0.8), scores)
    torch.testing.assert_close(top_p, _expected(scores, 1.0, [0, 1, 2]), rtol=0, atol=0.01)


def test_a_seeded_generator_repeats_its_draws_and_leaves_the_global_random_state_alone():
    scores = torch.zeros(4, 50)
    state = torch.get_rng_state()
    a = sampler(SamplingParams(), torch.Generator().manual_seed(3))(None, scores.clone()).argmax(-1)
    b = sampler(SamplingParams(), torch.Generator().manual_seed(3))(None, scores.clone()).argmax(-1)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
