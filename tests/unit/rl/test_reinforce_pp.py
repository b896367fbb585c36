"""REINFORCE++ and REINFORCE++-baseline (grpo.advantage) against written-out references: the group step, the
normalisation over every completion token of the whole step (not per group, not per rank), and the token-level KL
in the reward as per-token returns."""

import math

import torch

from r1cli.config import load_config
from r1cli.rl.advantages import group_advantages, token_returns, whiten_batch
from r1cli.rl.loop import Behaviour, Scored, add_advantages
from r1cli.token_batch import TokenBatch

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # two groups of four
LENGTHS = [3, 5, 2, 4, 6, 1, 3, 2]


def token_mask(lengths=LENGTHS):
    m = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


def whiten_by_hand(values_per_token: list[list[float]], eps: float) -> tuple[float, float]:
    """Mean and unbiased std over every token of every sample, written out."""
    flat = [v for row in values_per_token for v in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))
    return mean, std + eps


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens_the_batch():
    eps = 1e-6
    centred = [r - (sum(REWARDS[:4]) if i < 4 else sum(REWARDS[4:])).item() / 4 for i, r in enumerate(REWARDS.tolist())]
    mean, std = whiten_by_hand([[c] * n for c, n in zip(centred, LENGTHS)], eps)
    want = torch.tensor([(c - mean) / std for c in centred])
    got = whiten_batch(group_advantages(REWARDS, 4, "reinforce++-baseline"), token_mask(), eps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # normalised per group instead (GRPO's way), the numbers differ: the test above can tell
    per_group = group_advantages(REWARDS, 4, "grpo", eps)
    assert not torch.allclose(got, per_group, atol=1e-3)


def test_reinforce_pp_has_no_group_baseline():
    eps = 1e-6
    mean, std = whiten_by_hand([[r] * n for r, n in zip(REWARDS.tolist(), LENGTHS)], eps)
    got = whiten_batch(group_advantages(REWARDS, 4, "reinforce++"), token_mask(), eps)
    torch.testing.assert_close(got, (REWARDS - mean) / std, rtol=1e-6, atol=1e-7)


def test_the_statistics_span_every_rank():
    """Two ranks holding half the step each: the whitened advantages equal one rank holding all of it."""
    mask, adv = token_mask(), group_advantages(REWARDS, 4, "reinforce++-baseline")
    whole = whiten_batch(adv, mask, 1e-6)
    halves = [(adv[:4], mask[:4]), (adv[4:], mask[4:])]
    locals_ = [(float(m.sum()), float((a[:, None] * m).sum()), float((a[:, None] ** 2 * m).sum())) for a, m in halves]
    ranks = [whiten_batch(a, m, 1e-6, gather=lambda local: locals_) for a, m in halves]
    torch.testing.assert_close(torch.cat(ranks), whole)
    alone = whiten_batch(adv[:4], mask[:4], 1e-6)  # a rank's own statistics: not the same
    assert not torch.allclose(alone, whole[:4], atol=1e-3)


def test_token_level_kl_enters_as_returns():
    g = torch.Generator().manual_seed(0)
    mask = token_mask()
    kl = torch.rand(mask.shape, generator=g) * mask
    beta = 0.3
    got = token_returns(REWARDS, kl, beta, mask)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            want = REWARDS[i].item() - beta * sum(kl[i, s].item() for s in range(t, n))
            assert abs(got[i, t].item() - want) < 1e-6
        assert (got[i, n:] == 0).all()


def test_add_advantages_gives_whitened_per_token_returns():
    cfg = load_config(None, ["grpo.advantage=reinforce++", "grpo.beta=0.3", "grpo.kl_in_reward=true",
                             "rollout.n=4", "grpo.prompts_per_step=2"])
    batch = TokenBatch.from_completions([[1, 2]] * 8, [[5] * n for n in LENGTHS])
    mask = batch.scored_mask()
    kl = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    scored = Scored(scores=None, rewards=REWARDS.clone(), lengths=torch.tensor(LENGTHS),
                    truncated=torch.zeros(8, dtype=torch.bool))
    add_advantages(batch, scored, Behaviour(None, None, kl), cfg)
    returns = token_returns(REWARDS, kl, 0.3, mask)
    mean, std = whiten_by_hand([returns[i, :n].tolist() for i, n in enumerate(LENGTHS)], cfg.grpo.adv_eps)
    adv = batch.fields["advantages"]
    assert adv.shape == mask.shape
    torch.testing.assert_close(adv[mask.bool()], ((returns - mean) / std)[mask.bool()], rtol=1e-5, atol=1e-6)
