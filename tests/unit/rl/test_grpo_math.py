"""The GRPO maths against hand-computed values and a straightforward loop implementation."""

import math

import pytest
import torch

from r1cli.rl.advantages import equal_reward_groups, group_advantages, overlong_penalty
from r1cli.rl.losses import aggregate, clipped_surrogate, kl_penalty, sequence_log_ratio
from r1cli.rl.objective import GRPOObjective


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(r, 4, "grpo", eps=0.0)[:4], torch.tensor(want[:4]))
    assert group_advantages(r, 4, "grpo", eps=1e-6)[4:].abs().max() == 0  # all equal: no signal, no NaN
    torch.testing.assert_close(group_advantages(r, 4, "drgrpo"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    # rloo: R_i minus the mean of the other three
    torch.testing.assert_close(group_advantages(r, 4, "rloo")[:4],
                               torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert equal_reward_groups(r, 4).tolist() == [False, True]


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = logp - ref  # log(pi/ref) = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    want = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), want)
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()


def test_k3_is_unbiased_for_kl():
    """E_pi[k3] = KL(pi || ref) for categorical pi, ref (Monte Carlo)."""
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g), 0)
    ref = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    est = kl_penalty(pi.log()[x], ref.log()[x], "k3").mean()
    exact = (pi * (pi.log() - ref.log())).sum()
    assert abs(float(est - exact)) < 0.01


def test_clipped_surrogate_by_hand():
    # ratios 1.5 (A>0 -> clipped at 1.2), 0.5 (A>0 -> unclipped), 0.5 (A<0 -> clipped at 0.8), 1.5 (A<0 -> unclipped)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(ratio.log(), adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 0.8, 1.5]))
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0]
    # clip-higher: eps_high 0.28 lets the first ratio reach 1.28
    loss, _ = clipped_surrogate(ratio.log(), adv, 0.2, 0.28)
    assert loss[0].item() == pytest.approx(-1.28)
    # dual clip c=3: for A<0 the loss is capped at 3|A|
    big = torch.tensor([10.0]).log()
    loss, clipped = clipped_surrogate(big, torch.tensor([-1.0]), 0.2, 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and clipped.item() == 1.0


def loop_objective(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, agg, max_len):
    """The paper's J(theta), written as plainly as possible (negated: a loss)."""
    B, T = logp.shape
    seq_terms, all_terms, n_tok = [], [], 0
    for i in range(B):
        terms = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            surr = torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_lo, 1 + eps_hi) * adv[i])
            kl = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            terms.append(-(surr - beta * kl))
        seq_terms.append(sum(terms) / len(terms))
        all_terms += terms
        n_tok += len(terms)
    if agg == "seq-mean-token-mean":
        return sum(seq_terms) / B
    if agg == "token-mean":
        return sum(all_terms) / n_tok
    return sum(all_terms) / (B * max_len)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_and_gradient_match_loop(agg):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=g))
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    objective = GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", loss_agg=agg, max_len=10)
    per_token, _ = objective.per_token(logp, None, old, ref, adv, mask)
    ours = objective.aggregate(per_token, mask)
    (g_ours,) = torch.autograd.grad(ours, logp)
    lp2 = logp.detach().clone().requires_grad_()
    want = loop_objective(lp2, old, ref, adv, mask, 0.2, 0.28, 0.04, agg, 10)
    (g_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(g_ours, g_want)
    assert (g_ours[mask == 0] == 0).all()


def test_split_normalisation_sums_to_whole():
    """Micro-batches normalised by the global counts add up to the full-batch loss (grad accumulation, DP)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(x, mask, agg, max_len=5)
        parts = sum(aggregate(x[s:s + 2], mask[s:s + 2], agg, num_seqs=6, num_tokens=mask.sum(), max_len=5)
                    for s in (0, 2, 4))
        torch.testing.assert_close(parts, whole)


def test_sequence_ratio_gspo():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # mean log-ratio over the two real tokens: (0.5 + 0) / 2
    torch.testing.assert_close(sequence_log_ratio(logp, old, mask)[0, :2], torch.tensor([0.25, 0.25]))


def test_log_ratio_is_clamped_before_exp():
    loss, _ = clipped_surrogate(torch.tensor([500.0, -500.0]), torch.tensor([-1.0, 1.0]), 0.2, 0.2)
    assert torch.isfinite(loss).all()


def test_overlong_penalty():
    pen = overlong_penalty(torch.tensor([10, 80, 90, 100]), max_len=100, buffer=20, penalty=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))
