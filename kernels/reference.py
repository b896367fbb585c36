"""Plain-torch references for every kernel in this package (same signatures, fp32 maths).

Tokens are flattened: logits [N, V], hidden [N, H], weight [V, H], and per-token
vectors [N]. These materialise [N, V]; the Triton kernels must match them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1cli.rl.losses import per_token_policy_loss


@dataclass
class TokenRecord:
    """Per-token by-products of a loss call, for metrics (all detached, [N])."""

    logp: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor | None


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


def loss_from_logprobs(logp: torch.Tensor, entropy: torch.Tensor | None, old_logp: torch.Tensor,
                       ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                       eps_low: float, eps_high: float, beta: float, kl: str = "k3", dual_clip: float = 0.0,
                       entropy_coef: float = 0.0, clamp: float = 20.0):
    """Per-token GRPO loss [N] (zero where mask is 0) from per-token log-probs (and entropy)."""
    terms = per_token_policy_loss(
        logp, old_logp.float(), None if ref_logp is None else ref_logp.float(), advantages.float(), mask,
        eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, dual_clip=dual_clip, clamp=clamp,
    )
    loss = terms.pg + beta * terms.kl
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    m = mask.float()
    rec = TokenRecord(logp.detach(), (terms.kl * m).detach(), (terms.clipped * m).detach(),
                      None if entropy is None else entropy.detach())
    return loss * m, rec


def grpo_loss_ref(logits: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                  eps_low: float, eps_high: float, beta: float, kl: str = "k3", temperature: float = 1.0,
                  dual_clip: float = 0.0, entropy_coef: float = 0.0, clamp: float = 20.0,
                  with_entropy: bool = False):
    """Per-token GRPO loss [N] (zero where mask is 0) and a TokenRecord."""
    logp, entropy = logprobs_ref(logits, targets, temperature=temperature,
                                 with_entropy=with_entropy or entropy_coef != 0)
    return loss_from_logprobs(logp, entropy, old_logp, ref_logp, advantages, mask, eps_low=eps_low,
                              eps_high=eps_high, beta=beta, kl=kl, dual_clip=dual_clip,
                              entropy_coef=entropy_coef, clamp=clamp)


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
