"""Log-probs (and the GRPO loss) from hidden states and the lm_head weight, never materialising [N, V].

Forward: for each chunk of tokens and each tile of the vocabulary, logits = h @ W_tile^T
(a cuBLAS matmul), then per-row online log-sum-exp statistics of the tile (Triton),
combined across tiles — and, for tensor parallelism, across the ranks that each hold a
vocabulary shard (max, then rescaled sums, all-reduced over the group). Only [N]
vectors are kept. Backward recomputes each logits tile, turns it into d(logits) in
place, and accumulates d(hidden) = dz @ W_tile (fp32, [N, H]) and d(weight) = dz^T @ h
(fp32 for one vocabulary tile at a time, then stored in the weight's dtype).

The GRPO loss is then plain elementwise maths on the [N] log-probs (the objective's per_token:
GRPOObjective.per_token in r1cli/rl/objective.py), so this path and the reference share one definition of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .records import ElementwiseObjective, TokenRecord
from .reference import tile_grad_ref, tile_stats_ref

LOGITS_BUDGET_BYTES = 1 << 30  # one logits tile of at most 1 GiB
VOCAB_TILE = 32768  # columns per vocabulary tile: bounds the fp32 d(weight) accumulator to VOCAB_TILE x H


def _ops(use_triton: bool):
    if use_triton:
        from .grpo_logits import tile_grad, tile_stats

        return tile_stats, tile_grad
    return tile_stats_ref, tile_grad_ref


def combine_stats(parts: list[tuple], group=None):
    """Merge per-tile (max, sumexp, sumexp*z, target logit) into row totals; all-reduce over `group`."""
    m = torch.stack([p[0] for p in parts]).max(0).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    zs = sum(p[2] * torch.exp(p[0] - m) for p in parts)
    zt = torch.stack([p[3] for p in parts]).max(0).values
    if group is not None:
        sums = torch.stack([s, zs])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        s, zs = sums[0], sums[1]
        dist.all_reduce(zt, op=dist.ReduceOp.MAX, group=group)
    lse = m + torch.log(s)
    return zt - lse, lse, lse - zs / s  # logp, lse, entropy


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the vocabulary GEMMs run in: autocast's where it is on for this device (the trainer's mixed
    precision), else the hidden states' own. Chosen once in the forward and kept for the backward, which runs
    outside autocast: the recomputed logits then equal the forward's, so the softmax there matches the forward's
    log-sum-exp (bf16 logits against an fp32 recomputation gave probabilities summing to 0.98-1.04)."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place when the dtypes allow it (torch.mm's `out` must match its inputs' dtype)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _chunks(n: int, size: int):
    return [(a, min(n, a + size)) for a in range(0, n, size)]


class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_tokens, chunk_vocab, group,
                vocab_start, use_triton):
        stats_fn, _ = _ops(use_triton)
        n, V = hidden.shape[0], weight.shape[0]
        cd = matmul_dtype(hidden)
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse, ent = torch.empty_like(logp), torch.empty_like(logp)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit, as in the backward
            for a, b in _chunks(n, chunk_tokens):
                h, t = hidden[a:b].to(cd), targets[a:b]
                parts = [stats_fn(h @ weight[v0:v1].to(cd).t(), t, vocab_start + v0, temperature, with_entropy)
                         for v0, v1 in _chunks(V, chunk_vocab)]
                logp[a:b], lse[a:b], ent[a:b] = combine_stats(parts, group)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.cfg = (temperature, with_entropy, chunk_tokens, chunk_vocab, group, vocab_start, use_triton, cd)
        if not with_entropy:
            ent = torch.zeros_like(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        temperature, with_entropy, chunk_tokens, chunk_vocab, group, vocab_start, use_triton, cd = ctx.cfg
        _, grad_fn = _ops(use_triton)
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_h = g_ent.float() if (with_entropy and g_ent is not None) else None
        d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        d_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        # vocabulary tiles outside, token chunks inside: d(weight) of one tile is complete after
        # its inner loop, so its fp32 accumulator is [tile x H], never [V x H] -- and with a single
        # token chunk there is nothing to accumulate: the matmul writes the tile of d(weight) itself
        token_chunks = _chunks(hidden.shape[0], chunk_tokens)
        accumulate = d_weight is not None and len(token_chunks) > 1
        for v0, v1 in _chunks(weight.shape[0], chunk_vocab):
            w = weight[v0:v1].to(cd)  # the forward's GEMM dtype, for all three GEMMs
            dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if accumulate else None
            for a, b in token_chunks:
                h, t = hidden[a:b].to(cd), targets[a:b]
                z = h @ w.t()
                dz = grad_fn(z, t, vocab_start + v0, lse[a:b], ent[a:b], g_logp[a:b],
                             None if g_h is None else g_h[a:b], temperature, out=z)  # in place
                d_hidden[a:b] += dz @ w
                if accumulate:
                    dw += dz.t() @ h
                elif d_weight is not None:
                    _mm_into(d_weight[v0:v1], dz.t(), h)
                del z, dz  # else the next tile is allocated while this one is still alive: two tiles at peak
            if accumulate:
                d_weight[v0:v1] = dw
        if group is not None:
            # each rank saw only its vocabulary shard: d(hidden) is the sum over the group
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
        return (d_hidden.to(hidden.dtype), d_weight, None, None, None, None, None, None, None, None)


def _default_chunks(hidden, weight, chunk_tokens, chunk_vocab):
    """Vocabulary tiles of VOCAB_TILE columns; as many tokens per chunk as fit one logits tile in the budget."""
    V = weight.shape[0]
    chunk_vocab = chunk_vocab or min(V, VOCAB_TILE)
    per_row = chunk_vocab * hidden.element_size()
    chunk_tokens = chunk_tokens or max(1, min(hidden.shape[0], LOGITS_BUDGET_BYTES // per_row))
    return chunk_tokens, chunk_vocab


def fused_linear_logprobs_impl(hidden, weight, targets, *, temperature=1.0, with_entropy=False,
                               chunk_tokens=0, chunk_vocab=0, group=None, vocab_start=0, use_triton=True):
    ct, cv = _default_chunks(hidden, weight, chunk_tokens, chunk_vocab)
    logp, ent = FusedLinearLogprobs.apply(hidden, weight, targets.contiguous(), temperature, with_entropy, ct, cv,
                                          group, vocab_start, use_triton)
    return logp, (ent if with_entropy else None)


def triton_fused_linear_logprobs(hidden, weight, targets, *, temperature=1.0, with_entropy=False, **kw):
    return fused_linear_logprobs_impl(hidden, weight, targets, temperature=temperature,
                                      with_entropy=with_entropy, use_triton=True, **kw)


def fused_linear_grpo_loss_impl(hidden, weight, targets, old_logp, ref_logp, advantages, mask, *,
                                objective: ElementwiseObjective, with_entropy=False, use_triton=True, **kw):
    logp, ent = fused_linear_logprobs_impl(hidden, weight, targets, temperature=objective.temperature,
                                           with_entropy=with_entropy or objective.needs_entropy,
                                           use_triton=use_triton, **kw)
    return objective.per_token(logp, ent, old_logp, ref_logp, advantages, mask)


def triton_fused_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, **kw):
    return fused_linear_grpo_loss_impl(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                       use_triton=True, **kw)


# ------------------------------------------------------------------ one pass: the gradient formed in the forward


class FusedLinearObjective(torch.autograd.Function):
    """sum_i w_i * loss_i from hidden states, with d(hidden) and d(weight) formed during the forward.

    Each chunk of tokens gets its full [chunk x V] logits once (one matmul), its log-sum-exp, its per-token loss
    and -- the weights w_i being known -- d(objective)/d(logits) in place, then d(hidden) of the chunk (complete:
    the chunk saw all of V) and its share of d(weight). The backward only scales them by the incoming scalar.
    Matmul work 6*N*H*V, as eager torch, against 8*N*H*V for FusedLinearLogprobs, which recomputes the logits
    in its backward; the price is an fp32 [V x H] d(weight) accumulator when there is more than one chunk.
    Outputs: the objective and, not differentiable, per-token loss, log-prob, KL, clipped flag and entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, per_token_loss, temperature, with_entropy,
                chunk_tokens, group, vocab_start, use_triton):
        stats_fn, grad_fn = _ops(use_triton)
        chunks = _chunks(hidden.shape[0], chunk_tokens)
        want_dw = ctx.needs_input_grad[1]
        cd = matmul_dtype(hidden)  # every GEMM below in autocast's dtype (or the inputs'), explicitly
        wc = weight.to(cd)
        # under tensor parallelism d(hidden) is summed over ranks: in fp32, as the recompute path does
        d_hidden = torch.empty_like(hidden, dtype=torch.float32 if group is not None else hidden.dtype)
        d_weight = torch.empty_like(weight) if want_dw else None
        acc = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if want_dw and len(chunks) > 1 else None
        objective = torch.zeros((), device=hidden.device, dtype=torch.float32)
        recs = []
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit
            for a, b in chunks:
                h, t = hidden[a:b].to(cd), targets[a:b]
                z = h @ wc.t()
                logp, lse, ent = combine_stats([stats_fn(z, t, vocab_start, temperature, with_entropy)], group)
                with torch.enable_grad():  # d(objective)/d(logp, entropy) on [chunk] vectors, by the loss's autograd
                    leaves = [logp.requires_grad_()] + ([ent.requires_grad_()] if with_entropy else [])
                    loss, rec = per_token_loss(logp, ent if with_entropy else None, a, b)
                    part = (loss * token_weights[a:b].float()).sum()
                    grads = torch.autograd.grad(part, leaves, allow_unused=True)
                grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
                objective += part.detach()
                recs.append((loss.detach(), rec.logp, rec.kl, rec.clipped, ent.detach()))
                dz = grad_fn(z, t, vocab_start, lse, ent.detach(), grads[0], grads[1] if with_entropy else None,
                             temperature, out=z)  # in place
                _mm_into(d_hidden[a:b], dz, wc)
                if acc is not None:
                    acc += dz.t() @ h
                elif want_dw:
                    _mm_into(d_weight, dz.t(), h)
                del z, dz
        if acc is not None:
            d_weight.copy_(acc)
        if group is not None:  # each rank saw only its vocabulary shard
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.hidden_dtype = hidden.dtype
        outs = [torch.cat(parts) for parts in zip(*recs)]
        ctx.mark_non_differentiable(*outs)
        return (objective, *outs)

    @staticmethod
    def backward(ctx, g, *_records):
        # scaled in place (a copy of d(weight) would be another [V x H]), so the graph is backward-ed once
        d_hidden, d_weight = ctx.saved_tensors  # g stays a tensor: float(g) would synchronise the GPU
        if d_weight is not None:
            d_weight.mul_(g.to(d_weight.dtype))
        d_hidden = d_hidden.mul_(g.to(d_hidden.dtype)).to(ctx.hidden_dtype)
        return (d_hidden, d_weight, None, None, None, None, None, None, None, None, None)


def fused_linear_weighted_loss_impl(hidden, weight, targets, token_weights, per_token_loss, *, temperature=1.0,
                                    with_entropy=False, chunk_tokens=0, group=None, vocab_start=0, use_triton=True):
    """Scalar sum_i token_weights_i * loss_i, per-token loss [N] and TokenRecord; see FusedLinearObjective.

    per_token_loss(logp, entropy, a, b) -> (loss, TokenRecord) is the elementwise loss of tokens a..b: any
    weighted sum of an elementwise per-token loss (every GRPO aggregation, SFT's mean NLL) fits."""
    n, (V, H) = hidden.shape[0], weight.shape
    if not chunk_tokens:
        # one chunk when its logits cost no more than chunking would (a budget-sized chunk plus the fp32
        # [V x H] d(weight) accumulator that several chunks need); else chunks of the budget
        one_chunk = n * V * hidden.element_size() <= LOGITS_BUDGET_BYTES + V * H * 4
        chunk_tokens = n if one_chunk else max(1, LOGITS_BUDGET_BYTES // (V * hidden.element_size()))
    objective, loss, logp, klv, clipped, ent = FusedLinearObjective.apply(
        hidden, weight, targets.contiguous(), token_weights, per_token_loss, temperature, with_entropy,
        chunk_tokens, group, vocab_start, use_triton)
    return objective, loss, TokenRecord(logp, klv, clipped, ent if with_entropy else None)


def fused_linear_grpo_objective_impl(hidden, weight, targets, old_logp, ref_logp, advantages, mask, token_weights,
                                     *, objective: ElementwiseObjective, with_entropy=False, **kw):
    """The GRPO objective aggregated with `token_weights`, its gradient formed in the forward."""
    per_token_loss = objective.chunked(old_logp, ref_logp, advantages, mask)
    return fused_linear_weighted_loss_impl(hidden, weight, targets, token_weights, per_token_loss,
                                           temperature=objective.temperature,
                                           with_entropy=with_entropy or objective.needs_entropy, **kw)
