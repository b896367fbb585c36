"""GRPO kernels: log-probs, ratio, clip and KL in one pass; Triton on CUDA, plain torch elsewhere.

`impl` is "auto" (Triton for CUDA tensors when triton is installed, the reference
otherwise), "triton" (also on CPU under TRITON_INTERPRET=1) or "torch".
"""

from __future__ import annotations

import os

import torch

from r1cli.errors import missing_extra

from .reference import (
    TokenRecord,
    fused_linear_grpo_loss_ref,
    fused_linear_logprobs_ref,
    grpo_loss_ref,
    logprobs_ref,
)

__all__ = ["TokenRecord", "grpo_loss", "fused_linear_grpo_loss", "fused_linear_grpo_objective", "logprobs",
           "fused_linear_logprobs", "pick_impl"]


def pick_impl(impl: str, device: torch.device) -> str:
    if impl == "torch":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if impl == "triton":
            raise missing_extra("triton", "triton") from None
        return "torch"
    if impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("kernels=triton on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if device.type == "cuda" else "torch"


def logprobs(logits, targets, *, temperature: float = 1.0, with_entropy: bool = False, impl: str = "auto"):
    """log p(target) [N] (and entropy [N]) from logits [N, V]; differentiable."""
    if pick_impl(impl, logits.device) == "triton":
        from .grpo_logits import triton_logprobs

        return triton_logprobs(logits, targets, temperature=temperature, with_entropy=with_entropy)
    return logprobs_ref(logits, targets, temperature=temperature, with_entropy=with_entropy)


def grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, *, eps_low: float, eps_high: float,
              beta: float, kl: str = "k3", temperature: float = 1.0, dual_clip: float = 0.0,
              entropy_coef: float = 0.0, clamp: float = 20.0, with_entropy: bool = False, inplace: bool = False,
              impl: str = "auto"):
    """Per-token GRPO loss [N] (masked tokens are 0) and a TokenRecord, from logits [N, V].

    The record carries entropy when entropy_coef != 0 or with_entropy (for metrics). inplace=True (Triton)
    writes d(logits) into the logits buffer, saving an [N, V] tensor: only when nothing else in the
    backward graph needs the logits (true after a plain lm_head matmul, false after e.g. a tanh soft-cap)."""
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, temperature=temperature,
              dual_clip=dual_clip, entropy_coef=entropy_coef, clamp=clamp, with_entropy=with_entropy)
    if pick_impl(impl, logits.device) == "triton":
        from .grpo_logits import triton_grpo_loss

        return triton_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, inplace=inplace, **kw)
    return grpo_loss_ref(logits, targets, old_logp, ref_logp, advantages, mask, **kw)


def fused_linear_logprobs(hidden, weight, targets, *, temperature: float = 1.0, with_entropy: bool = False,
                          impl: str = "auto"):
    """log p(target) from hidden [N, H] and lm_head weight [V, H] without materialising [N, V] (Triton)."""
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import triton_fused_linear_logprobs

        return triton_fused_linear_logprobs(hidden, weight, targets, temperature=temperature,
                                            with_entropy=with_entropy)
    return fused_linear_logprobs_ref(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy)


def fused_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, *, eps_low: float,
                           eps_high: float, beta: float, kl: str = "k3", temperature: float = 1.0,
                           dual_clip: float = 0.0, entropy_coef: float = 0.0, clamp: float = 20.0,
                           with_entropy: bool = False, impl: str = "auto"):
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, temperature=temperature,
              dual_clip=dual_clip, entropy_coef=entropy_coef, clamp=clamp, with_entropy=with_entropy)
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import triton_fused_linear_grpo_loss

        return triton_fused_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, **kw)
    return fused_linear_grpo_loss_ref(hidden, weight, targets, old_logp, ref_logp, advantages, mask, **kw)


def fused_linear_grpo_objective(hidden, weight, targets, old_logp, ref_logp, advantages, mask, token_weights, *,
                                eps_low: float, eps_high: float, beta: float, kl: str = "k3",
                                temperature: float = 1.0, dual_clip: float = 0.0, entropy_coef: float = 0.0,
                                clamp: float = 20.0, with_entropy: bool = False, impl: str = "auto"):
    """The aggregated loss sum_i token_weights_i * loss_i (a scalar), the per-token loss [N] and a TokenRecord.

    Same maths as `fused_linear_grpo_loss` followed by a weighted sum, but with the aggregation weights known
    up front the gradient is formed in the forward (one pass over the logits, 6*N*H*V matmul flops instead of
    8*N*H*V); every GRPO aggregation (sequence mean, token mean, Dr. GRPO) is such a weighted sum."""
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, temperature=temperature,
              dual_clip=dual_clip, entropy_coef=entropy_coef, clamp=clamp, with_entropy=with_entropy)
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import fused_linear_grpo_objective_impl

        return fused_linear_grpo_objective_impl(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                                token_weights, use_triton=True, **kw)
    loss, rec = fused_linear_grpo_loss_ref(hidden, weight, targets, old_logp, ref_logp, advantages, mask, **kw)
    return (loss * token_weights.float()).sum(), loss, rec
