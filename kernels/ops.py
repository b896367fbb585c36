"""GRPO kernels: log-probs, ratio, clip and KL in one pass; Triton on CUDA, plain torch elsewhere.

`impl` is "auto" (Triton for CUDA tensors when triton is installed, the reference
otherwise), "triton" (also on CPU under TRITON_INTERPRET=1) or "torch".
"""

from __future__ import annotations

import os

import torch

from r1cli.errors import missing_extra

from .distill import fused_linear_distill
from .records import ElementwiseObjective, TokenRecord
from .reference import fused_linear_grpo_loss_ref, fused_linear_logprobs_ref, grpo_loss_ref, logprobs_ref

__all__ = ["TokenRecord", "grpo_loss", "fused_linear_grpo_loss", "fused_linear_grpo_objective",
           "fused_linear_weighted_loss", "logprobs", "fused_linear_logprobs", "fused_linear_distill", "pick_impl"]


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


def _kernel_scalars(objective: ElementwiseObjective) -> dict:
    """The spec as the fused kernels' scalar arguments; those kernels apply token-level ratios and the ppo or cispo
    policy losses only."""
    if not objective.elementwise:
        raise ValueError(f"the fused GRPO kernels apply token-level ratios, not ratio_level={objective.ratio_level!r}")
    policy = objective.policy_loss
    if policy not in ("ppo", "cispo"):
        raise ValueError(f"the fused GRPO kernels compute grpo.policy_loss ppo or cispo, not {policy!r}: "
                         "train.kernels=torch")
    return dict(eps_low=objective.eps_low, eps_high=objective.eps_high, beta=objective.beta, kl=objective.kl,
                temperature=objective.temperature, dual_clip=objective.dual_clip,
                entropy_coef=objective.entropy_coef, clamp=objective.clamp, policy_loss=policy)


def grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, *, objective: ElementwiseObjective,
              with_entropy: bool = False, inplace: bool = False, impl: str = "auto"):
    """Per-token GRPO loss [N] (masked tokens are 0) and a TokenRecord, from logits [N, V].

    The record carries entropy when the objective has an entropy bonus or with_entropy (for metrics).
    inplace=True (Triton) writes d(logits) into the logits buffer, saving an [N, V] tensor: only when nothing
    else in the backward graph needs the logits (true after a plain lm_head matmul, false after e.g. a tanh
    soft-cap)."""
    if pick_impl(impl, logits.device) == "triton":
        from .grpo_logits import triton_grpo_loss

        return triton_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, inplace=inplace,
                                with_entropy=with_entropy, **_kernel_scalars(objective))
    return grpo_loss_ref(logits, targets, old_logp, ref_logp, advantages, mask, objective=objective,
                         with_entropy=with_entropy)


def fused_linear_logprobs(hidden, weight, targets, *, temperature: float = 1.0, with_entropy: bool = False,
                          impl: str = "auto"):
    """log p(target) from hidden [N, H] and lm_head weight [V, H] without materialising [N, V] (Triton)."""
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import triton_fused_linear_logprobs

        return triton_fused_linear_logprobs(hidden, weight, targets, temperature=temperature,
                                            with_entropy=with_entropy)
    return fused_linear_logprobs_ref(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy)


def fused_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, *,
                           objective: ElementwiseObjective, with_entropy: bool = False, impl: str = "auto"):
    """Per-token GRPO loss [N] and a TokenRecord from hidden states; the logits are recomputed in the backward."""
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import triton_fused_linear_grpo_loss

        return triton_fused_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                             objective=objective, with_entropy=with_entropy)
    return fused_linear_grpo_loss_ref(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                      objective=objective, with_entropy=with_entropy)


def fused_linear_weighted_loss(hidden, weight, targets, token_weights, per_token_loss, *, temperature: float = 1.0,
                               with_entropy: bool = False, impl: str = "auto"):
    """sum_i token_weights_i * loss_i (a scalar), the per-token loss [N] and a TokenRecord, where
    per_token_loss(logp, entropy, a, b) -> (loss, TokenRecord) is elementwise over tokens a..b.

    With the weights known up front the gradient is formed in the forward (one pass over the logits,
    6*N*H*V matmul flops instead of 8*N*H*V); every GRPO aggregation and SFT's mean NLL is such a sum."""
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import fused_linear_weighted_loss_impl

        return fused_linear_weighted_loss_impl(hidden, weight, targets, token_weights, per_token_loss,
                                               temperature=temperature, with_entropy=with_entropy, use_triton=True)
    logp, ent = fused_linear_logprobs_ref(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy)
    loss, rec = per_token_loss(logp, ent, 0, hidden.shape[0])
    return (loss * token_weights.float()).sum(), loss, rec


def fused_linear_grpo_objective(hidden, weight, targets, old_logp, ref_logp, advantages, mask, token_weights, *,
                                objective: ElementwiseObjective, with_entropy: bool = False, impl: str = "auto"):
    """The GRPO objective aggregated by `token_weights` (objective.token_weights), its per-token loss and a
    TokenRecord: `fused_linear_grpo_loss` then a weighted sum, with the gradient formed in the forward."""
    _kernel_scalars(objective)  # token-level only
    if pick_impl(impl, hidden.device) == "triton":
        from .fused_linear import fused_linear_grpo_objective_impl

        return fused_linear_grpo_objective_impl(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                                token_weights, objective=objective, with_entropy=with_entropy,
                                                use_triton=True)
    loss, rec = fused_linear_grpo_loss_ref(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                           objective=objective, with_entropy=with_entropy)
    return (loss * token_weights.float()).sum(), loss, rec
