"""Logit distillation from hidden states: KL between the teacher's and the student's token distributions,
with the student's NLL beside it, in chunks of tokens so that the [N x V] logits never exist whole.

Per scored token t with student logits z = h W^T and teacher logits u = h' W'^T (the teacher's rows beyond
the student's vocabulary dropped), at temperature T:

    forward KL   KL(p_u || p_z)  = sum_v p_u (log p_u - log p_z)
    reverse KL   KL(p_z || p_u)  = sum_v p_z (log p_z - log p_u)
    loss         sum_t w_t [ alpha * T^2 * KL_t + (1 - alpha) * (-log softmax(z)_y) ]

(T^2 keeps the gradient's scale when T changes; Hinton et al. 2015.) The gradient with respect to each
chunk's student logits is formed in the forward pass and turned into the hidden-state and weight gradients
there (as Liger's fused linear losses do), so the backward only scales what was kept: peak extra memory is a
few [chunk x V] blocks. `fused_linear_distill_ref` is the plain reference the tests hold this to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_linear import matmul_dtype


def _chunk_terms(z, u, y, alpha: float, reverse: bool, temperature: float):
    """Per-token loss terms (kl, nll) and d(alpha T^2 kl + (1 - alpha) nll)/dz for one chunk, in fp32."""
    T = temperature
    log_q = F.log_softmax(z / T, -1)  # student at temperature T
    log_p = F.log_softmax(u / T, -1)  # teacher
    q = log_q.exp()
    if reverse:
        kl = (q * (log_q - log_p)).sum(-1)
        d_kl = q * (log_q - log_p - kl[:, None]) / T
    else:
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        d_kl = (q - p) / T
    log_s = F.log_softmax(z, -1) if T != 1.0 else log_q
    nll = -log_s.gather(-1, y[:, None]).squeeze(-1)
    d_nll = log_s.exp()
    d_nll.scatter_add_(-1, y[:, None], -torch.ones_like(y[:, None], dtype=d_nll.dtype))
    return kl, nll, alpha * T * T * d_kl + (1.0 - alpha) * d_nll


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, th, tw, y, weights, alpha, reverse, temperature, chunk):
        V = w.shape[0]
        # the four [chunk x V x H] GEMMs in autocast's dtype (or the inputs'), each weight cast once: fp32 GEMMs
        # with TF32 off run at a fraction of a GPU's bf16 rate; the softmax terms and d(weight)'s sum stay fp32
        cd = matmul_dtype(h)
        wc, twc = w.to(cd), tw.to(cd)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        kl_sum = torch.zeros_like(loss)
        nll_sum = torch.zeros_like(loss)
        with torch.autocast(h.device.type, enabled=False):  # the casts are explicit
            for a in range(0, h.shape[0], chunk):
                b = min(a + chunk, h.shape[0])
                hs = h[a:b].to(cd)
                z = (hs @ wc.T).float()
                u = (th[a:b].to(cd) @ twc.T)[:, :V].float()
                kl, nll, g = _chunk_terms(z, u, y[a:b], alpha, reverse, temperature)
                del z, u
                wt = weights[a:b].float()
                loss += (wt * (alpha * temperature * temperature * kl + (1.0 - alpha) * nll)).sum()
                kl_sum += kl.sum()
                nll_sum += nll.sum()
                g = (g * wt[:, None]).to(cd)
                grad_h[a:b] = g @ wc
                grad_w += g.T @ hs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(kl_sum, nll_sum)
        return loss, kl_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, _kl, _nll):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None, None)


def fused_linear_distill(hidden, weight, teacher_hidden, teacher_weight, targets, weights, *, alpha: float = 0.5,
                         direction: str = "forward", temperature: float = 1.0, chunk: int = 1024):
    """(loss, kl sum, nll sum) over N scored tokens: hidden [N, H] and weight [V, H] of the student (they get
    gradients), teacher_hidden [N, H'] and teacher_weight [V' >= V, H'] (no gradients), targets [N], per-token
    weights [N]."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be forward or reverse, not {direction!r}")
    if teacher_weight.shape[0] < weight.shape[0]:
        raise ValueError(f"the teacher's vocabulary ({teacher_weight.shape[0]}) is smaller than the student's "
                         f"({weight.shape[0]}): logit distillation needs the same tokenizer")
    return _FusedLinearDistill.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets,
                                     weights, float(alpha), direction == "reverse", float(temperature), int(chunk))
