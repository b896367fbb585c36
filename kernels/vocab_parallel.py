"""Vocab-parallel log-probs and GRPO loss for tensor parallelism.

Each rank of `group` holds a contiguous shard of the vocabulary ([N, V/tp] logits, or a
[V/tp, H] lm_head shard). The row max, the rescaled sum-exp (and sum-exp*z for entropy)
and the target logit are all-reduced over the group; the backward needs no
communication for d(logits), and all-reduces d(hidden) for the fused-linear form.
"""

from __future__ import annotations

import torch

from .fused_linear import _ops, combine_stats, fused_linear_grpo_objective_impl, fused_linear_logprobs_impl
from .records import ElementwiseObjective


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, temperature, with_entropy, use_triton):
        stats_fn, _ = _ops(use_triton)
        logits = logits.contiguous()
        logp, lse, ent = combine_stats([stats_fn(logits, targets, vocab_start, temperature, with_entropy)], group)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.cfg = (vocab_start, temperature, with_entropy, use_triton)
        return logp, ent if with_entropy else torch.zeros_like(ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        vocab_start, temperature, with_entropy, use_triton = ctx.cfg
        _, grad_fn = _ops(use_triton)
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_h = g_ent if (with_entropy and g_ent is not None) else None
        d = grad_fn(logits, targets, vocab_start, lse, ent, g_logp, g_h, temperature)
        return d, None, None, None, None, None, None


def _use_triton(impl: str, device: torch.device) -> bool:
    from .ops import pick_impl

    return pick_impl(impl, device) == "triton"


def vocab_parallel_logprobs(logits_shard, targets, vocab_start: int, group, *, temperature=1.0,
                            with_entropy=False, impl="auto"):
    """log p(target) [N] (and entropy) when this rank holds logits[:, vocab_start : vocab_start + V/tp]."""
    logp, ent = _VocabParallelLogprobs.apply(logits_shard, targets.contiguous(), vocab_start, group, temperature,
                                             with_entropy, _use_triton(impl, logits_shard.device))
    return logp, (ent if with_entropy else None)


def vocab_parallel_grpo_loss(logits_shard, targets, old_logp, ref_logp, advantages, mask, vocab_start: int, group,
                             *, objective: ElementwiseObjective, with_entropy=False, impl="auto"):
    logp, ent = vocab_parallel_logprobs(logits_shard, targets, vocab_start, group, temperature=objective.temperature,
                                        with_entropy=with_entropy or objective.needs_entropy, impl=impl)
    return objective.per_token(logp, ent, old_logp, ref_logp, advantages, mask)


def vocab_parallel_fused_linear_logprobs(hidden, weight_shard, targets, vocab_start: int, group, *,
                                         temperature=1.0, with_entropy=False, impl="auto", **chunks):
    return fused_linear_logprobs_impl(hidden, weight_shard, targets, temperature=temperature,
                                      with_entropy=with_entropy, group=group, vocab_start=vocab_start,
                                      use_triton=_use_triton(impl, hidden.device), **chunks)


def vocab_parallel_fused_linear_grpo_loss(hidden, weight_shard, targets, old_logp, ref_logp, advantages, mask,
                                          vocab_start: int, group, *, objective: ElementwiseObjective,
                                          with_entropy=False, impl="auto", **chunks):
    logp, ent = vocab_parallel_fused_linear_logprobs(hidden, weight_shard, targets, vocab_start, group,
                                                     temperature=objective.temperature,
                                                     with_entropy=with_entropy or objective.needs_entropy,
                                                     impl=impl, **chunks)
    return objective.per_token(logp, ent, old_logp, ref_logp, advantages, mask)


def vocab_parallel_fused_linear_grpo_objective(hidden, weight_shard, targets, old_logp, ref_logp, advantages, mask,
                                               token_weights, vocab_start: int, group, *, impl="auto", **kw):
    """`fused_linear_grpo_objective` (gradient formed in the forward) with this rank's vocabulary shard."""
    return fused_linear_grpo_objective_impl(hidden, weight_shard, targets, old_logp, ref_logp, advantages, mask,
                                            token_weights, group=group, vocab_start=vocab_start,
                                            use_triton=_use_triton(impl, hidden.device), **kw)
