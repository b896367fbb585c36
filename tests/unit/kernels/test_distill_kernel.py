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



@pytest.mark.parametrize("inputs, autocast", [(torch.bfloat16, False), (torch.float32, True)])
def test_the_vocabulary_gemms_run_in_bf16_and_stay_near_the_fp32_reference(inputs, autocast):
    """bf16 weights (model.dtype=bfloat16), or fp32 ones under bf16 autocast (bf16-mixed): all four [chunk x V x H]
    GEMMs run in bf16 - in fp32 with TF32 off a 32k-token micro-batch's ~143 TFLOP ran at a fraction of the GPU's
    rate - while the softmax terms stay fp32: the loss and gradients within bf16's rounding of the fp32
    reference on the same inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GemmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    N, H, V = 40, 32, 96
    h = torch.randn(N, H, generator=g).to(inputs).requires_grad_()
    w = (0.3 * torch.randn(V, H, generator=g)).to(inputs).requires_grad_()
    th, tw = torch.randn(N, H, generator=g).to(inputs), (0.3 * torch.randn(V, H, generator=g)).to(inputs)
    y, wt = torch.randint(0, V, (N,), generator=g), torch.full((N,), 1.0 / N)
    rec = GemmDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), rec:
        loss, _, _ = fused_linear_distill(h, w, th, tw, y, wt, chunk=16)
    assert len(rec.seen) == 4 * 3 and all(d == (torch.bfloat16, torch.bfloat16) for d in rec.seen)  # 3 chunks
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = [t.detach().float().requires_grad_() for t in (h, w)]
    rloss, _, _ = fused_linear_distill_ref(*ref, th.float(), tw.float(), y, wt)
    rh, rw = torch.autograd.grad(rloss, ref)
    torch.testing.assert_close(loss.float(), rloss, rtol=2e-2, atol=0)
    for a, b in [(gh, rh), (gw, rw)]:
        assert a.dtype == inputs and float((a.float() - b).norm() / b.norm()) < 3e-2
