"""GRPO policy-loss maths: small pure functions of tensors, auditable against the papers.

Shapes: per-token tensors are [B, T] with a 0/1 `mask` over completion tokens.
Every log-ratio is clamped before exp so that one wild token cannot overflow.

    r_t   = exp(logp_t - old_logp_t)                               (new over old)
    L_t   = -min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A)           DeepSeekMath eq. 3
    dual  : for A < 0, L_t = min(L_t, -c A)                          Ye et al. 2020
    KL_t  : k1 = log(pi/ref), k2 = (log(pi/ref))^2 / 2, k3 = ref/pi - log(ref/pi) - 1   (Schulman 2020)
    GSPO  : r_i = exp(mean_t(logp - old_logp)) for the whole sequence (Zheng et al. 2025)
    CISPO : L_t = -sg(clip(r_t, 1-eps_low, 1+eps_high)) A log r_t      MiniMax-M1 (2025): every token keeps a
            REINFORCE gradient -w A d(log p), its importance weight w clipped and detached

Four registries name the variants (grpo.policy_loss, grpo.kl_estimator, grpo.loss_agg, grpo.ratio_level);
objective.py assembles them into one spec.
"""

from __future__ import annotations

import torch

from r1cli.registry import Registry

KL_ESTIMATORS = Registry("KL estimator", "grpo.kl_estimator")  # log(pi/ref) per token -> KL estimate
AGGREGATIONS = Registry("loss aggregation", "grpo.loss_agg")  # per-token loss -> scalar
RATIO_LEVELS = Registry("ratio level", "grpo.ratio_level")  # (logp, old_logp, mask) -> per-token log-ratio
# (log_ratio, advantages, eps_low, eps_high, dual_clip, clamp) -> (per-token loss, 0/1 flag where a clip acted)
POLICY_LOSSES = Registry("policy loss", "grpo.policy_loss")


@KL_ESTIMATORS.register("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


@KL_ESTIMATORS.register("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


@KL_ESTIMATORS.register("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # ref/pi - log(ref/pi) - 1 with log(ref/pi) = -log_ratio; non-negative, unbiased
    return torch.exp(-log_ratio) + log_ratio - 1.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi."""
    return KL_ESTIMATORS.get(estimator)((logp - ref_logp).clamp(-clamp, clamp))


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


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(log_ratio, advantages, eps_low, eps_high, dual_clip=0.0, clamp=20.0):
    """The clipped surrogate of PPO, GRPO and DAPO: a token whose ratio left [1-eps_low, 1+eps_high] in the direction
    its advantage pushes gets no gradient."""
    return clipped_surrogate(log_ratio, advantages, eps_low, eps_high, dual_clip, clamp)


@POLICY_LOSSES.register("cispo")
def cispo_policy_loss(log_ratio, advantages, eps_low, eps_high, dual_clip=0.0, clamp=20.0):
    """CISPO (MiniMax-M1): -sg(w) A log r with w = clip(r, 1-eps_low, 1+eps_high). Its gradient is -w A d(log p)
    for every token - the clip bounds the weight, it drops no token's gradient - and it equals PPO's where the
    ratio is inside the clip range. The value is 0 on-policy (log r = 0), as the surrogate's is -A."""
    ratio = torch.exp(log_ratio.detach().clamp(-clamp, clamp))
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -advantages * weight * log_ratio, (weight != ratio).to(log_ratio.dtype)


@RATIO_LEVELS.register("token")
def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logp - old_logp


@RATIO_LEVELS.register("sequence")
def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: the length-normalised sequence log-ratio, broadcast to every token.

    Written as logp - sg(logp) + sg(seq_mean) so that its value is the sequence ratio
    and its gradient reaches each token through the mean (GSPO-token form).
    """
    n = mask.sum(-1).clamp(min=1)
    seq = ((logp - old_logp) * mask).sum(-1) / n
    per_token_grad = (logp * mask).sum(-1) / n
    return (seq.detach() + per_token_grad - per_token_grad.detach()).unsqueeze(-1).expand_as(logp)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(per_token, mask, num_seqs, num_tokens, max_len):
    """Mean over sequences of each sequence's token mean (GRPO paper)."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / (num_seqs if num_seqs is not None else per_token.shape[0])


@AGGREGATIONS.register("token-mean")
def token_mean(per_token, mask, num_seqs, num_tokens, max_len):
    """Sum over all tokens / number of tokens (DAPO)."""
    return (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token, mask, num_seqs, num_tokens, max_len):
    """Sum over all tokens / (sequences * constant max_len) (Dr. GRPO)."""
    if max_len is None:
        raise ValueError("seq-mean-token-sum-norm needs max_len (the generation budget)")
    return (per_token * mask).sum() / ((num_seqs if num_seqs is not None else per_token.shape[0]) * max_len)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, num_seqs: float | None = None,
              num_tokens: float | None = None, max_len: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar with the aggregation named `mode`.

    num_seqs / num_tokens let a caller normalise by the global batch when a batch is
    split across micro-batches or ranks (the sum of the pieces then equals the whole).
    """
    return AGGREGATIONS.get(mode)(per_token, mask.to(per_token.dtype), num_seqs, num_tokens, max_len)


def aggregation_weights(mask: torch.Tensor, mode: str, **kw) -> torch.Tensor:
    """The w with aggregate(x, mask, mode) == (w * x).sum() for every x (aggregate is linear in x), taken
    from aggregate itself so the two can never disagree; lets a fused loss form its gradient in the forward."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (w,) = torch.autograd.grad(aggregate(x, mask, mode, **kw), x)
    return w
