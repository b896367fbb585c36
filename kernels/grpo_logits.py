"""Triton: GRPO loss (and log-probs / entropy) from logits, one streaming pass over the vocabulary.

Forward, one program per row: online log-sum-exp over V (temperature applied),
the target logit, optional entropy, then in registers the ratio against the old
log-prob, the clipped surrogate (eps_low / eps_high, dual clip), the KL estimator
and d(loss)/d(logp). Backward recomputes softmax from the saved log-sum-exp and
writes d(logits), optionally into the logits buffer itself. Masked rows skip the
vocabulary loop entirely.

Also here: the tile primitives (`tile_stats`, `tile_grad`) that the fused-linear
and vocab-parallel variants build on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _online_stats(base, V, n_active, target, inv_temp, WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Running max m, sum exp(z - m), sum exp(z - m) * z and the target's scaled logit, over [0, n_active)."""
    m = float("-inf")
    s = 0.0
    zs = 0.0
    # the target's logit is one scalar load, not a reduction per block (-inf when outside this tile)
    hit = (target >= 0) & (target < V) & (n_active > 0)
    zt = tl.load(base + tl.where(hit, target, 0), mask=hit, other=float("-inf")).to(tl.float32) * inv_temp
    for off in range(0, n_active, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        valid = cols < V
        z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * scale + tl.sum(e, 0)
        if WITH_ENT:
            zs = zs * scale + tl.sum(e * tl.where(valid, z, 0.0), 0)  # no 0 * -inf on padding
        m = m_new
    return m, s, zs, zt


@triton.jit
def _grpo_fwd_kernel(
    logits_ptr, stride_row, targets_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr,
    loss_ptr, logp_ptr, lse_ptr, ent_ptr, kl_ptr, clipped_ptr, dlogp_ptr,
    V, inv_temp, eps_low, eps_high, beta, dual_clip, ent_coef, clamp,
    HAS_LOSS: tl.constexpr, HAS_REF: tl.constexpr, KL: tl.constexpr, WITH_ENT: tl.constexpr,
    CISPO: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = 1
    if HAS_LOSS:
        active = tl.load(mask_ptr + row).to(tl.int32)
    n_active = V * active  # masked rows read nothing
    target = tl.load(targets_ptr + row).to(tl.int64)
    m, s, zs, zt = _online_stats(logits_ptr + row * stride_row, V, n_active, target, inv_temp, WITH_ENT, BLOCK_V)
    on = active != 0
    lse = tl.where(on, m + tl.log(tl.maximum(s, 1e-30)), 0.0)
    logp = tl.where(on, zt - lse, 0.0)
    ent = 0.0
    if WITH_ENT:
        ent = tl.where(on, lse - zs / tl.maximum(s, 1e-30), 0.0)
        tl.store(ent_ptr + row, ent)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if HAS_LOSS:
        old = tl.load(old_ptr + row).to(tl.float32)
        adv = tl.load(adv_ptr + row).to(tl.float32)
        d = logp - old
        inside = (d >= -clamp) & (d <= clamp)
        ratio = tl.exp(tl.minimum(tl.maximum(d, -clamp), clamp))
        weight = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        if CISPO:  # -sg(w) A log r: every token's gradient is -w A, the clip bounds w (r1cli.rl.losses)
            pg = -adv * weight * d
            is_clipped = weight != ratio
            dpg = -adv * weight
        else:
            unclipped = -adv * ratio
            clipped = -adv * weight
            pg = tl.maximum(unclipped, clipped)
            is_clipped = clipped > unclipped
            dpg = tl.where(is_clipped | (~inside), 0.0, -adv * ratio)
        if dual_clip > 1.0:
            bound = -adv * dual_clip
            use_bound = (adv < 0) & (bound < pg)
            pg = tl.where(use_bound, bound, pg)
            dpg = tl.where(use_bound, 0.0, dpg)
            is_clipped = is_clipped | use_bound
        loss = pg
        dlogp = dpg
        kl = 0.0
        if HAS_REF:
            ref = tl.load(ref_ptr + row).to(tl.float32)
            r = logp - ref
            inside_k = (r >= -clamp) & (r <= clamp)
            r = tl.minimum(tl.maximum(r, -clamp), clamp)
            if KL == 1:
                kl = r
                dkl = tl.where(inside_k, 1.0, 0.0)
            elif KL == 2:
                kl = 0.5 * r * r
                dkl = tl.where(inside_k, r, 0.0)
            else:
                er = tl.exp(-r)
                kl = er + r - 1.0
                dkl = tl.where(inside_k, 1.0 - er, 0.0)
            loss = loss + beta * kl
            dlogp = dlogp + beta * dkl
        if WITH_ENT:
            loss = loss - ent_coef * ent
        tl.store(loss_ptr + row, tl.where(on, loss, 0.0))
        tl.store(kl_ptr + row, tl.where(on, kl, 0.0))
        tl.store(clipped_ptr + row, tl.where(on & is_clipped, 1.0, 0.0))
        tl.store(dlogp_ptr + row, tl.where(on, dlogp, 0.0))


@triton.jit
def _grad_kernel(
    z_ptr, stride_z, dz_ptr, stride_dz, targets_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    V, v_start, inv_temp, WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """d/dlogits of g_logp * logp + g_ent * entropy, for vocabulary columns [v_start, v_start + V)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_logp_ptr + row).to(tl.float32)
    ge = 0.0
    H = 0.0
    if WITH_ENT:
        ge = tl.load(g_ent_ptr + row).to(tl.float32)
        H = tl.load(ent_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    target = tl.load(targets_ptr + row).to(tl.int64) - v_start
    n_load = tl.where(tl.abs(g) + tl.abs(ge) > 0.0, V, 0)  # rows with no gradient read nothing
    z_base = z_ptr + row * stride_z
    dz_base = dz_ptr + row * stride_dz
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        valid = cols < V
        loaded = cols < n_load
        z = tl.load(z_base + cols, mask=loaded, other=0.0).to(tl.float32) * inv_temp
        logp_j = z - lse
        p = tl.exp(logp_j)
        d = tl.where(cols == target, g, 0.0) - g * p
        if WITH_ENT:
            d += -ge * p * (logp_j + H)
        d = tl.where(loaded, d * inv_temp, 0.0)
        tl.store(dz_base + cols, d.to(dz_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _stats_kernel(z_ptr, stride_z, targets_ptr, m_ptr, s_ptr, zs_ptr, zt_ptr, V, v_start, inv_temp,
                  WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64) - v_start
    m, s, zs, zt = _online_stats(z_ptr + row * stride_z, V, V, target, inv_temp, WITH_ENT, BLOCK_V)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(zs_ptr + row, zs)
    tl.store(zt_ptr + row, zt)


# Launch settings per kernel: the vocabulary columns a program streams per step (capped by V), warps per
# program and software-pipelining depth. Chosen so that, on sm_90, every bf16 load and store is 16 bytes per
# thread with several in flight and nothing spills (`python -m r1cli.kernels.aot` shows it); not yet timed on
# a GPU -- `python benchmarks/grpo_kernels.py --sweep` times the alternatives and names the fastest.
LAUNCH = {
    "fwd": dict(block=4096, num_warps=4, num_stages=3),  # loss / log-probs from logits
    "stats": dict(block=4096, num_warps=4, num_stages=3),  # fused linear: statistics of one logits tile
    "grad": dict(block=4096, num_warps=4, num_stages=3),  # d(logits), from logits or one tile
}


def _launch(kind: str, V: int) -> dict:
    cfg = LAUNCH[kind]
    block = min(cfg["block"], triton.next_power_of_2(V)) if V > 0 else 16
    return dict(BLOCK_V=block, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ------------------------------------------------------------------ tile primitives


def tile_stats(z: torch.Tensor, targets: torch.Tensor, v_start: int, temperature: float, with_entropy: bool):
    """Per-row (max, sum-exp, sum-exp*z, target logit or -inf) of z / T over one vocabulary tile."""
    n, V = z.shape
    out = [torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(4)]
    if n:
        _stats_kernel[(n,)](z, z.stride(0), targets, *out, V, v_start, 1.0 / temperature,
                            WITH_ENT=with_entropy, **_launch("stats", V))
    return tuple(out)


def tile_grad(z: torch.Tensor, targets: torch.Tensor, v_start: int, lse, entropy, g_logp, g_ent,
              temperature: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d(logits) for one vocabulary tile given the row totals; `out` may be `z` itself (in place)."""
    n, V = z.shape
    dz = torch.empty_like(z) if out is None else out
    with_ent = g_ent is not None
    if n:
        _grad_kernel[(n,)](z, z.stride(0), dz, dz.stride(0), targets, lse,
                           entropy if with_ent else lse, g_logp.float().contiguous(),
                           g_ent.float().contiguous() if with_ent else g_logp, V, v_start, 1.0 / temperature,
                           WITH_ENT=with_ent, **_launch("grad", V))
    return dz


# ------------------------------------------------------------------ loss from logits


class _GRPOLossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, kl,
                temperature, dual_clip, entropy_coef, clamp, has_loss, with_entropy, inplace, cispo):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        n, V = logits.shape
        dev = logits.device
        f32 = dict(device=dev, dtype=torch.float32)
        loss, logp, lse, ent, klv, clipped, dlogp = (torch.zeros(n, **f32) for _ in range(7))
        targets = targets.contiguous()
        dummy = lse
        has_ref = has_loss and ref_logp is not None and beta > 0
        if n:
            _grpo_fwd_kernel[(n,)](
                logits, logits.stride(0), targets,
                old_logp.float().contiguous() if has_loss else dummy,
                ref_logp.float().contiguous() if has_ref else dummy,
                advantages.float().contiguous() if has_loss else dummy,
                mask.to(torch.int32).contiguous() if has_loss else dummy,
                loss, logp, lse, ent, klv, clipped, dlogp,
                V, 1.0 / temperature, eps_low, eps_high, beta, dual_clip, entropy_coef, clamp,
                HAS_LOSS=has_loss, HAS_REF=has_ref, KL=KL_CODES[kl], WITH_ENT=with_entropy, CISPO=cispo,
                **_launch("fwd", V),
            )
        # d(loss)/d(entropy): -entropy_coef on rows in the loss, 0 on masked rows
        dent = -entropy_coef * mask.float() if has_loss and with_entropy else None
        ctx.save_for_backward(logits, targets, lse, ent, dlogp, dent)
        ctx.cfg = (temperature, entropy_coef, has_loss, with_entropy, inplace)
        ctx.mark_non_differentiable(klv, clipped)
        return loss, logp, ent, klv, clipped

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent, _g_kl, _g_clipped):
        logits, targets, lse, ent, dlogp, dent = ctx.saved_tensors
        temperature, entropy_coef, has_loss, with_entropy, inplace = ctx.cfg
        g_lp = torch.zeros_like(lse)
        g_h = torch.zeros_like(lse) if with_entropy else None
        if has_loss and g_loss is not None:
            g_lp = g_lp + g_loss.float() * dlogp
            if with_entropy:
                g_h = g_h + dent * g_loss.float()
        if g_logp is not None:
            g_lp = g_lp + g_logp.float()
        if with_entropy and g_ent is not None:
            g_h = g_h + g_ent.float()
        d = tile_grad(logits, targets, 0, lse, ent, g_lp, g_h, temperature, out=logits if inplace else None)
        return (d,) + (None,) * 17


def triton_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, *, eps_low, eps_high, beta,
                     kl="k3", temperature=1.0, dual_clip=0.0, entropy_coef=0.0, clamp=20.0, with_entropy=False,
                     inplace=False, policy_loss="ppo"):
    from .reference import TokenRecord

    with_ent = with_entropy or entropy_coef != 0
    loss, logp, ent, klv, clipped = _GRPOLossFromLogits.apply(
        logits, targets, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, kl, temperature,
        dual_clip, entropy_coef, clamp, True, with_ent, inplace, policy_loss == "cispo")
    return loss, TokenRecord(logp.detach(), klv, clipped, ent.detach() if with_ent else None)


def triton_logprobs(logits, targets, *, temperature=1.0, with_entropy=False, inplace=False):
    _, logp, ent, _, _ = _GRPOLossFromLogits.apply(
        logits, targets, None, None, None, None, 0.0, 0.0, 0.0, "k3", temperature, 0.0, 0.0, 20.0, False,
        with_entropy, inplace, False)
    return logp, (ent if with_entropy else None)
