"""GRPO policy-loss maths: small pure functions of tensors, auditable against the papers.

Shapes: per-token tensors are [B, T] with a 0/1 `mask` over completion tokens.
Every log-ratio is clamped before exp so that one wild token cannot overflow.

    r_t   = exp(logp_t - old_logp_t)                               (new over old)
    L_t   = -min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A)           DeepSeekMath eq. 3
    dual  : for A < 0, L_t = min(L_t, -c A)                          Ye et al. 2020
    KL_t  : k1 = log(pi/ref), k2 = (log(pi/ref))^2 / 2, k3 = ref/pi - log(ref/pi) - 1   (Schulman 2020)
    GSPO  : r_i = exp(mean_t(logp - old_logp)) for the whole sequence (Zheng et al. 2025)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi."""
    log_ratio = (logp - ref_logp).clamp(-clamp, clamp)  # log(pi / ref)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # ref/pi - log(ref/pi) - 1 with log(ref/pi) = -log_ratio; non-negative, unbiased
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
                      dual_clip: float = 0.0, clamp: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO loss (to minimise) and a 0/1 flag where clipping bound the value."""
    ratio = torch.exp(log_ratio.clamp(-clamp, clamp))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).to(loss.dtype)
    if dual_clip > 1.0:
        base = loss
        bound = -advantages * dual_clip  # for A < 0 the loss may not exceed -c A
        loss = torch.where(advantages < 0, torch.minimum(base, bound), base)
        was_clipped = torch.where(loss < base, torch.ones_like(was_clipped), was_clipped)
    return loss, was_clipped


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: the length-normalised sequence log-ratio, broadcast to every token.

    Written as logp - sg(logp) + sg(seq_mean) so that its value is the sequence ratio
    and its gradient reaches each token through the mean (GSPO-token form).
    """
    n = mask.sum(-1).clamp(min=1)
    seq = ((logp - old_logp) * mask).sum(-1) / n
    per_token_grad = (logp * mask).sum(-1) / n
    return (seq.detach() + per_token_grad - per_token_grad.detach()).unsqueeze(-1).expand_as(logp)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, num_seqs: float | None = None,
              num_tokens: float | None = None, max_len: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    seq-mean-token-mean      : mean over sequences of each sequence's token mean (GRPO paper)
    token-mean               : sum over all tokens / number of tokens (DAPO)
    seq-mean-token-sum-norm  : sum over all tokens / (sequences * constant max_len) (Dr. GRPO)

    num_seqs / num_tokens let a caller normalise by the global batch when a batch is
    split across micro-batches or ranks (the sum of the pieces then equals the whole).
    """
    mask = mask.to(per_token.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / (num_seqs if num_seqs is not None else per_token.shape[0])
    if mode == "token-mean":
        return (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    if mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the generation budget)")
        return (per_token * mask).sum() / ((num_seqs if num_seqs is not None else per_token.shape[0]) * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(LOSS_AGGS)})")


def aggregation_weights(mask: torch.Tensor, mode: str, **kw) -> torch.Tensor:
    """The w with aggregate(x, mask, mode) == (w * x).sum() for every x (aggregate is linear in x), taken
    from aggregate itself so the two can never disagree; lets a fused loss form its gradient in the forward."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (w,) = torch.autograd.grad(aggregate(x, mask, mode, **kw), x)
    return w


@dataclass
class PolicyLossTerms:
    pg: torch.Tensor  # per-token surrogate loss
    kl: torch.Tensor  # per-token KL (zeros when beta == 0)
    clipped: torch.Tensor  # per-token 0/1
    log_ratio: torch.Tensor


def per_token_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                          advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float, eps_high: float,
                          beta: float, kl: str = "k3", dual_clip: float = 0.0, ratio_level: str = "token",
                          clamp: float = 20.0) -> PolicyLossTerms:
    """Per-token terms of the GRPO objective; `advantages` has logp's shape or is [B] for [B, T] logp."""
    adv = advantages if advantages.shape == logp.shape else advantages.unsqueeze(-1).expand_as(logp)
    if ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logp, old_logp, mask)
    else:
        log_ratio = logp - old_logp
    pg, clipped = clipped_surrogate(log_ratio, adv, eps_low, eps_high, dual_clip, clamp)
    if beta > 0 and ref_logp is not None:
        kl_t = kl_penalty(logp, ref_logp, kl, clamp)
    else:
        kl_t = torch.zeros_like(logp)
    return PolicyLossTerms(pg=pg, kl=kl_t, clipped=clipped, log_ratio=log_ratio)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
