"""grpo.policy_loss against written-out references, token by token (values and gradients), with masks, through
both aggregations - and the Triton kernel held to the same numbers (TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.rl.objective import GRPOObjective

EPS_LOW, EPS_HIGH = 0.2, 0.28


def batch(seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g)  # ratios on both sides of the clip range
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    mask[:, 0] = 1
    return logp, old, adv, mask


def cispo_by_hand(logp, old, adv, mask, agg):
    """The MiniMax-M1 objective written out token by token: loss_t = -w_t A log r_t with w_t = clip(r_t) a
    constant, so d loss_t / d logp_t = -w_t A for every token; then the aggregation's weights."""
    b, t = logp.shape
    loss = torch.zeros(b, t, dtype=torch.float64)
    grad = torch.zeros(b, t, dtype=torch.float64)
    n_tokens = float(mask.sum())
    for i in range(b):
        n_i = float(mask[i].sum())
        for j in range(t):
            if not mask[i, j]:
                continue
            d = float(logp[i, j] - old[i, j])
            r = torch.tensor(d, dtype=torch.float64).exp().item()
            w = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
            scale = 1 / (b * n_i) if agg == "seq-mean-token-mean" else 1 / n_tokens
            loss[i, j] = -w * float(adv[i]) * d * scale
            grad[i, j] = -w * float(adv[i]) * scale
    return loss.sum(), grad


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_cispo_against_the_written_out_objective(agg):
    logp, old, adv, mask = batch()
    obj = GRPOObjective(eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg=agg, policy_loss="cispo")
    x = logp.clone().requires_grad_()
    per_token, rec = obj.per_token(x, None, old, None, adv, mask)
    value = obj.aggregate(per_token, mask)
    value.backward()
    want_value, want_grad = cispo_by_hand(logp, old, adv, mask, agg)
    torch.testing.assert_close(value.double(), want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    ratio = (logp - old).exp()
    outside = ((ratio < 1 - EPS_LOW) | (ratio > 1 + EPS_HIGH)) & mask.bool()
    assert outside.sum() > 3 and torch.equal(rec.clipped.bool(), outside)  # the clip acted, and is reported
    # every clipped token still has a gradient (PPO's clipped surrogate gives some of them none)
    assert (x.grad[outside] != 0).all()
    ppo = GRPOObjective(eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg=agg)
    y = logp.clone().requires_grad_()
    ppo.aggregate(ppo.per_token(y, None, old, None, adv, mask)[0], mask).backward()
    assert (y.grad[outside] == 0).any()
    inside = ~outside & mask.bool()  # where nothing is clipped the two gradients agree
    torch.testing.assert_close(x.grad[inside], y.grad[inside])


def test_an_undetached_weight_would_fail_the_reference():
    """The same written-out check, on the formula with the clipped weight left in the graph: the gradient differs
    (d(w log r) = (w + r log r) d log p inside the range), so the test above can fail."""
    logp, old, adv, mask = batch(seed=1)
    x = logp.clone().requires_grad_()
    d = x - old
    w = d.exp().clamp(1 - EPS_LOW, 1 + EPS_HIGH)  # not detached
    value = (-(w * adv[:, None] * d) * mask).sum(-1).div(mask.sum(-1)).mean()
    value.backward()
    _, want_grad = cispo_by_hand(logp, old, adv, mask, "seq-mean-token-mean")
    assert not torch.allclose(x.grad.double(), want_grad, rtol=1e-3, atol=1e-5)


def test_cispo_refuses_what_it_does_not_define():
    cfg = load_config(None, ["grpo.policy_loss=cispo", "grpo.dual_clip=3"])
    with pytest.raises(R1Error, match="dual_clip"):  # r1 rl builds the objective before any model loads
        GRPOObjective.from_config(cfg.grpo, 1.0, 0)
    with pytest.raises(R1Error, match="ratio_level"):
        GRPOObjective(policy_loss="cispo", ratio_level="sequence")
    with pytest.raises(R1Error, match="unknown grpo.policy_loss|no policy loss|policy loss"):
        load_config(None, ["grpo.policy_loss=cispoo"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernel_computes_cispo_as_the_reference(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from r1cli.kernels import ops as kernels

    g = torch.Generator().manual_seed(2)
    n, V = 12, 5000
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(n, generator=g)
    adv, mask = torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.25).float()
    obj = GRPOObjective(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.04, kl="k3", policy_loss="cispo")
    ref = logp + 0.2 * torch.randn(n, generator=g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la, ra = kernels.grpo_loss(a, targets, old, ref, adv, mask, objective=obj, impl="triton")
    lb, rb = kernels.grpo_loss(b, targets, old, ref, adv, mask, objective=obj, impl="torch")
    w = torch.randn(n, generator=g)
    (la * w).sum().backward()
    (lb * w).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(la, lb, **tol)
    assert torch.equal(ra.clipped, rb.clipped) and ra.clipped.sum() > 0
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
    assert os.environ["TRITON_INTERPRET"] == "1"
