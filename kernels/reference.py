"""Plain-torch references for every kernel in this package (same signatures, fp32 maths).

Tokens are flattened: logits [N, V], hidden [N, H], weight [V, H], and per-token
vectors [N]. These materialise [N, V]; the Triton kernels must match them.
"""

from __future__ import annotations

import torch

from .records import ElementwiseObjective, TokenRecord

__all__ = ["TokenRecord", "logprobs_ref", "fused_linear_logprobs_ref", "grpo_loss_ref", "fused_linear_grpo_loss_ref",
           "tile_stats_ref", "tile_grad_ref"]


def logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def fused_linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                              temperature: float = 1.0, with_entropy: bool = False):
    return logprobs_ref(hidden @ weight.t(), targets, temperature=temperature, with_entropy=with_entropy)


def grpo_loss_ref(logits: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                  objective: ElementwiseObjective, with_entropy: bool = False):
    """Per-token GRPO loss [N] (zero where mask is 0) and a TokenRecord."""
    logp, entropy = logprobs_ref(logits, targets, temperature=objective.temperature,
                                 with_entropy=with_entropy or objective.needs_entropy)
    return objective.per_token(logp, entropy, old_logp, ref_logp, advantages, mask)


def fused_linear_grpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               old_logp, ref_logp, advantages, mask, **kw):
    return grpo_loss_ref(hidden @ weight.t(), targets, old_logp, ref_logp, advantages, mask, **kw)


# ------------------------------------------------------------------ tile primitives (torch)


def tile_stats_ref(z: torch.Tensor, targets: torch.Tensor, v_start: int, temperature: float, with_entropy: bool):
    """Per-row (max, sum exp(z-max), sum exp(z-max)*z, target logit or -inf) of z / T over one vocab tile."""
    zf = z.float() / temperature
    m = zf.max(-1).values
    e = torch.exp(zf - m.unsqueeze(-1))
    s = e.sum(-1)
    zs = (e * zf).sum(-1) if with_entropy else torch.zeros_like(s)
    local = targets.long() - v_start
    inside = (local >= 0) & (local < z.shape[-1])
    zt = zf.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return m, s, zs, torch.where(inside, zt, torch.full_like(zt, float("-inf")))


def tile_grad_ref(z, targets, v_start, lse, entropy, g_logp, g_ent, temperature, out=None):
    zf = z.float() / temperature
    logp_j = zf - lse.unsqueeze(-1)
    p = torch.exp(logp_j)
    d = -g_logp.float().unsqueeze(-1) * p
    local = targets.long() - v_start
    inside = (local >= 0) & (local < z.shape[-1])
    rows = inside.nonzero().squeeze(-1)
    d[rows, local[rows]] += g_logp.float()[rows]
    if g_ent is not None:
        d = d - g_ent.float().unsqueeze(-1) * p * (logp_j + entropy.unsqueeze(-1))
    d = (d / temperature).to(z.dtype)
    if out is not None:
        out.copy_(d)
        return out
    return d


def fused_linear_distill_ref(hidden, weight, teacher_hidden, teacher_weight, targets, weights, *, alpha=0.5,
                             direction="forward", temperature=1.0):
    """The distillation loss written plainly with whole [N, V] logits and autograd (kernels/distill.py)."""
    z = hidden.float() @ weight.float().T
    u = (teacher_hidden.float() @ teacher_weight.float().T)[:, : weight.shape[0]].detach()
    T = temperature
    log_q, log_p = torch.log_softmax(z / T, -1), torch.log_softmax(u / T, -1)
    if direction == "forward":
        kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        kl = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    nll = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    loss = (weights.float() * (alpha * T * T * kl + (1 - alpha) * nll)).sum()
    return loss, kl.detach().sum(), nll.detach().sum()
