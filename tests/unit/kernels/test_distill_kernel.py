"""Logit distillation's chunked loss and gradients equal the plain reference with whole logits."""

import pytest
import torch

from r1cli.kernels.ops import fused_linear_distill
from r1cli.kernels.reference import fused_linear_distill_ref


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("alpha, temperature, chunk", [(0.5, 1.0, 7), (1.0, 2.0, 64), (0.0, 1.0, 5), (0.3, 0.7, 1)])
def test_matches_the_reference(direction, alpha, temperature, chunk):
    g = torch.Generator().manual_seed(hash((direction, alpha, chunk)) % 1000)
    N, H, Ht, V, Vt = 23, 16, 24, 50, 56  # the teacher's padded vocabulary is wider than the student's
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_()
    th, tw = torch.randn(N, Ht, generator=g, dtype=torch.float64), 0.5 * torch.randn(Vt, Ht, generator=g,
                                                                                        dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    wt = torch.rand(N, generator=g, dtype=torch.float64) / N
    kw = dict(alpha=alpha, direction=direction, temperature=temperature)
    loss, kl, nll = fused_linear_distill(h, w, th, tw, y, wt, chunk=chunk, **kw)
    (gh, gw) = torch.autograd.grad(2.0 * loss, (h, w))
    rloss, rkl, rnll = fused_linear_distill_ref(h, w, th, tw, y, wt, **kw)
    (rh, rw) = torch.autograd.grad(2.0 * rloss, (h, w))
    for a, b in [(loss, rloss), (kl, rkl), (nll, rnll), (gh, rh), (gw, rw)]:
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    assert kl > 0 and nll > 0


def test_a_student_equal_to_its_teacher_has_zero_kl():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(12, 8, generator=g)
    for direction in ("forward", "reverse"):
        loss, kl, _ = fused_linear_distill(h.requires_grad_(), w, h.detach(), w, torch.zeros(9, dtype=torch.long),
                                           torch.ones(9), alpha=1.0, direction=direction, chunk=4)
        assert abs(float(kl)) < 1e-5 and abs(float(loss.detach())) < 1e-5


def test_a_smaller_teacher_vocabulary_is_refused():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="same tokenizer"):
        fused_linear_distill(h, w, h, w[:8], torch.zeros(3, dtype=torch.long), torch.ones(3))
