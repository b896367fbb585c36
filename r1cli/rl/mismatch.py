"""The rollout engine's log-probs against the trainer's, for the same sampled tokens.

A fast engine (vLLM: other kernels, bf16, batch-dependent reductions) samples from a
distribution slightly different from the one the trainer scores, so the GRPO ratio
is not quite on-policy. Two things follow from the engine's per-token log-probs:

    mismatch  KL(engine || trainer) per token by the k3 estimator over the engine's own
              samples: exp(r) - r - 1 with r = logp_trainer - logp_engine; its mean over
              completion tokens and its max are logged every step
    TIS       truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
              secretly brings you off-policy RL training"): each token's policy-gradient
              term is weighted by w_t = min(exp(logp_trainer - logp_engine), cap)
    MIS       masked importance sampling (IcePop, Ling team 2025; verl's rollout rejection): a
              token whose ratio exp(logp_trainer - logp_engine) lies outside [low, high] is left
              out of the loss (its mask 0); at the sequence level every token of a sample whose
              geometric-mean ratio exp(mean_t(logp_trainer - logp_engine)) lies outside; the
              loss's normalisation then counts the tokens kept

Every GRPO surrogate is positively homogeneous in the advantage (for w > 0,
clip(r) wA and min/max of such terms scale by w, and so does the dual-clip bound), so
the weight is applied as a per-token advantage A_t = w_t A; the KL and entropy terms
are not reweighted.
"""

from __future__ import annotations

import torch

from r1cli.rl.losses import kl_penalty


def engine_logprobs(logprobs: list[list[float] | None], width: int) -> torch.Tensor | None:
    """[B, width] grid of the engine's per-token log-probs (0 past each row's end), or None when the engine did
    not report them for every completion."""
    if not logprobs or any(lp is None for lp in logprobs):
        return None
    grid = torch.zeros(len(logprobs), width)
    for b, lp in enumerate(logprobs):
        grid[b, :len(lp)] = torch.tensor(lp[:width], dtype=torch.float32)
    return grid


def mismatch_terms(trainer_logp: torch.Tensor, engine_logp: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token KL(engine || trainer) over the masked tokens: sum, count and max, float64 tensors on the inputs'
    device (reduce over ranks: sum, sum, max)."""
    kl = (kl_penalty(engine_logp.float(), trainer_logp.float(), "k3") * mask).double()
    zero = torch.zeros((), dtype=torch.float64, device=kl.device)
    return {"sum": kl.sum(), "count": mask.double().sum(), "max": kl.max() if kl.numel() else zero}


def mismatch_sums(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """mismatch_terms of this rank's completion tokens, as floats."""
    return {k: float(v) for k, v in mismatch_terms(trainer_logp, engine_logp, mask).items()}


def tis_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """[B, T] min(p_trainer / p_engine, cap) on completion tokens (1 elsewhere); a constant, not differentiated."""
    w = torch.exp((trainer_logp.float() - engine_logp.float()).clamp(max=20.0)).clamp(max=cap)
    return torch.where(mask > 0, w, torch.ones_like(w)).detach()


def mis_keep(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, low: float, high: float,
             level: str = "token") -> torch.Tensor:
    """[B, T] 1 where a completion token stays in the loss, 0 where masked importance sampling leaves it out (and
    on padding): its ratio p_trainer / p_engine - or, at level "sequence", its sample's geometric-mean ratio -
    outside [low, high]."""
    log_ratio = (trainer_logp.float() - engine_logp.float()) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)
    inside = (log_ratio >= torch.log(torch.tensor(low))) & (log_ratio <= torch.log(torch.tensor(high)))
    return (inside & (mask > 0)).to(mask.dtype)
