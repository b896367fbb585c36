"""Every Triton kernel against its plain-torch reference: values and gradients (TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

pytest.importorskip("triton")

from r1cli.kernels import ops as kernels  # noqa: E402
from r1cli.kernels.fused_linear import fused_linear_logprobs_impl  # noqa: E402
from r1cli.rl.objective import GRPOObjective  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make(n, V, dtype, seed=0, all_masked=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(n, generator=g)  # ratios on both sides of the clip range
    ref = logp + 0.2 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)  # both signs
    mask = torch.zeros(n) if all_masked else (torch.rand(n, generator=g) > 0.25).float()
    return logits, targets, old, ref, adv, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("temperature,entropy_coef,dual_clip", [(1.0, 0.0, 0.0), (0.7, 0.01, 3.0)])
def test_grpo_loss_matches_reference(dtype, kl, temperature, entropy_coef, dual_clip):
    # V = 5000 streams two blocks of 4096, the second one partial
    logits, targets, old, ref, adv, mask = make(12, 5000, dtype)
    kw = dict(objective=GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl=kl, temperature=temperature,
                                      dual_clip=dual_clip, entropy_coef=entropy_coef))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la, ra = kernels.grpo_loss(a, targets, old, ref, adv, mask, impl="triton", **kw)
    lb, rb = kernels.grpo_loss(b, targets, old, ref, adv, mask, impl="torch", **kw)
    w = torch.randn(12, generator=torch.Generator().manual_seed(1))  # any downstream aggregation
    (la * w).sum().backward()
    (lb * w).sum().backward()
    on = mask.bool()
    torch.testing.assert_close(la, lb, **TOL[dtype])
    torch.testing.assert_close(ra.logp[on], rb.logp[on], **TOL[dtype])
    torch.testing.assert_close(ra.kl, rb.kl, **TOL[dtype])
    assert torch.equal(ra.clipped, rb.clipped) and ra.clipped.sum() > 0  # the clip range is exercised
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **TOL[dtype])
    assert (a.grad[~on] == 0).all()
    if entropy_coef:
        torch.testing.assert_close(ra.entropy[on], rb.entropy[on], **TOL[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_grpo_loss_matches_liger_kernel(impl):
    """An independent implementation (Liger-Kernel's Triton GRPO loss, token level, k3, no reduction) agrees
    token by token on loss, KL, clipped flag and d(logits): same objective, not just self-consistency."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger

    B, L, V, T = 3, 5, 5000, 0.7
    logits, targets, old, ref, _, mask = make(B * L, V, torch.float32, seed=8)
    logits = logits.view(B, L, V)
    adv = torch.tensor([1.3, -0.8, 0.4])  # Liger's advantages are per sequence
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04)
    a = logits.reshape(B * L, V).clone().requires_grad_()
    ours, rec = kernels.grpo_loss(a, targets, old, ref, adv.repeat_interleave(L), mask, impl=impl,
                                  objective=GRPOObjective(kl="k3", temperature=T, **kw))
    b = torch.cat([logits, torch.zeros(B, 1, V)], 1).requires_grad_()  # Liger drops the last position
    theirs, their_kl, their_clipped = liger(b, old.view(B, L), ref.view(B, L), targets.view(B, L), adv,
                                           mask.view(B, L), temperature=T, inplace=False, reduce=False, **kw)
    w = torch.randn(B * L, generator=torch.Generator().manual_seed(9))
    (ours * w).sum().backward()
    (theirs.reshape(-1) * w).sum().backward()
    on = mask.bool()
    torch.testing.assert_close(ours, theirs.reshape(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.kl, their_kl.reshape(-1), rtol=1e-4, atol=1e-5)
    assert torch.equal(rec.clipped.bool(), their_clipped.reshape(-1).bool() & on) and rec.clipped.sum() > 0
    torch.testing.assert_close(a.grad, b.grad[:, :L].reshape(B * L, V), rtol=1e-4, atol=1e-6)


def test_all_rows_masked_cost_nothing_and_give_zero():
    logits, targets, old, ref, adv, mask = make(5, 300, torch.float32, all_masked=True)
    x = logits.clone().requires_grad_()
    loss, rec = kernels.grpo_loss(x, targets, old, ref, adv, mask, impl="triton",
                                  objective=GRPOObjective(eps_low=0.2, eps_high=0.2, beta=0.1))
    loss.sum().backward()
    assert loss.abs().sum() == 0 and x.grad.abs().sum() == 0 and rec.kl.abs().sum() == 0


def test_backward_in_place_writes_into_logits():
    from r1cli.kernels.grpo_logits import triton_grpo_loss

    logits, targets, old, ref, adv, mask = make(6, 1000, torch.float32)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0)
    a = logits.clone().requires_grad_()
    buf = logits.clone().requires_grad_()
    loss, _ = triton_grpo_loss(buf, targets, old, None, adv, mask, **kw, inplace=True)
    loss.sum().backward()
    ref_loss, _ = kernels.grpo_loss(a, targets, old, None, adv, mask, impl="torch", objective=GRPOObjective(**kw))
    ref_loss.sum().backward()
    torch.testing.assert_close(buf.grad, a.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy(temperature):
    logits, targets, *_ = make(9, 4500, torch.float32, seed=3)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lpa, ea = kernels.logprobs(a, targets, temperature=temperature, with_entropy=True, impl="triton")
    lpb, eb = kernels.logprobs(b, targets, temperature=temperature, with_entropy=True, impl="torch")
    (lpa.sum() + 0.5 * ea.sum()).backward()
    (lpb.sum() + 0.5 * eb.sum()).backward()
    torch.testing.assert_close(lpa, lpb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [dict(), dict(chunk_tokens=5, chunk_vocab=333)])
def test_fused_linear_grpo_loss_matches_reference(dtype, chunks):
    g = torch.Generator().manual_seed(4)
    n, H, V = 13, 32, 1000
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax((hidden.float() @ weight.float().t()), -1).gather(-1, targets[:, None]).squeeze(-1)
    old, ref = logp + 0.3 * torch.randn(n, generator=g), logp + 0.2 * torch.randn(n, generator=g)
    adv, mask = torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.2).float()
    kw = dict(objective=GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", temperature=0.8,
                                      entropy_coef=0.01))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    from r1cli.kernels.fused_linear import fused_linear_grpo_loss_impl

    la, ra = fused_linear_grpo_loss_impl(h1, w1, targets, old, ref, adv, mask, use_triton=True, **chunks, **kw)
    lb, rb = kernels.fused_linear_grpo_loss(h2, w2, targets, old, ref, adv, mask, impl="torch", **kw)
    la.sum().backward()
    lb.sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(la, lb, **tol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), **tol)


def test_fused_linear_logprobs_no_grad_path():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(7, 16, generator=g), torch.randn(500, 16, generator=g)
    targets = torch.randint(0, 500, (7,), generator=g)
    with torch.no_grad():
        a, ea = fused_linear_logprobs_impl(hidden, weight, targets, with_entropy=True, chunk_tokens=2,
                                           use_triton=True)
        b, eb = kernels.fused_linear_logprobs(hidden, weight, targets, with_entropy=True, impl="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-4)


def _vocab_parallel_worker(rank, world, port, impl, out_dir):
    import torch.distributed as dist

    from r1cli.kernels.vocab_parallel import (
        vocab_parallel_fused_linear_grpo_loss,
        vocab_parallel_fused_linear_grpo_objective,
        vocab_parallel_grpo_loss,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(6)
    n, H, V = 9, 16, 1001
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (n,), generator=g)
    old, ref, adv = -7 + torch.randn(n, generator=g), -7 + torch.randn(n, generator=g), torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) > 0.2).float()
    kw = dict(objective=GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", temperature=0.9,
                                      entropy_coef=0.01), impl=impl)
    bounds = [0, 480, V]  # uneven shards
    lo, hi = bounds[rank], bounds[rank + 1]
    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    loss, rec = vocab_parallel_fused_linear_grpo_loss(h, w, targets, old, ref, adv, mask, lo, None if world == 1
                                                      else dist.group.WORLD, chunk_tokens=4, **kw)
    loss.sum().backward()
    logits = (hidden @ weight.t())[:, lo:hi].clone().requires_grad_()
    loss2, _ = vocab_parallel_grpo_loss(logits, targets, old, ref, adv, mask, lo, dist.group.WORLD, **kw)
    loss2.sum().backward()
    h3, w3 = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
    obj, _, _ = vocab_parallel_fused_linear_grpo_objective(h3, w3, targets, old, ref, adv, mask, torch.ones(n), lo,
                                                           dist.group.WORLD, chunk_tokens=4, **kw)
    obj.backward()
    torch.save({"loss": loss.detach(), "loss2": loss2.detach(), "dh": h.grad, "dw": w.grad, "dlogits": logits.grad,
                "obj": obj.detach(), "dh3": h3.grad, "dw3": w3.grad, "lo": lo, "hi": hi}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vocab_parallel_on_two_processes_equals_single(tmp_path, impl):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_vocab_parallel_worker, args=(2, port, impl, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # single process, full vocabulary, reference maths
    g = torch.Generator().manual_seed(6)
    n, H, V = 9, 16, 1001
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    old, ref, adv = -7 + torch.randn(n, generator=g), -7 + torch.randn(n, generator=g), torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) > 0.2).float()
    objective = GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", temperature=0.9, entropy_coef=0.01)
    loss, _ = kernels.fused_linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask, objective=objective,
                                             impl="torch")
    loss.sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r["loss"], loss.detach(), **tol)
        torch.testing.assert_close(r["loss2"], loss.detach(), **tol)
        torch.testing.assert_close(r["dh"], hidden.grad, **tol)
        torch.testing.assert_close(r["dw"], weight.grad[r["lo"]:r["hi"]], **tol)
        torch.testing.assert_close(r["obj"], loss.detach().sum(), **tol)  # one pass, weights 1
        torch.testing.assert_close(r["dh3"], hidden.grad, **tol)
        torch.testing.assert_close(r["dw3"], weight.grad[r["lo"]:r["hi"]], **tol)
    logits_grad = torch.cat([r0["dlogits"], r1["dlogits"]], dim=1)
    x = (hidden.detach() @ weight.detach().t()).requires_grad_()
    l3, _ = kernels.grpo_loss(x, targets, old, ref, adv, mask, objective=objective, impl="torch")
    l3.sum().backward()
    torch.testing.assert_close(logits_grad, x.grad, **tol)


@pytest.mark.parametrize("n", [4096, 32768])
def test_memory_at_qwen_size_counted(n):
    """Tensor memory at the real shapes (H = 3584, V = 151936, bf16), counted under FakeTensorMode: the fused
    linear path needs at most 1/8 of eager torch's peak, and the loss from logits needs only d(logits)."""
    from r1cli.kernels.fused_linear import fused_linear_grpo_loss_impl
    from r1cli.kernels.grpo_logits import triton_grpo_loss
    from r1cli.kernels.memcount import counted_peak
    from r1cli.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref

    H, V = 3584, 151936
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04)

    def small():
        return torch.randint(0, V, (n,)), -torch.rand(n), -torch.rand(n), torch.randn(n), torch.ones(n)

    def linear_in():
        return (torch.randn(n, H, dtype=torch.bfloat16).requires_grad_(),
                torch.randn(V, H, dtype=torch.bfloat16).requires_grad_()) + small()

    def logits_in():
        return (torch.randn(n, V, dtype=torch.bfloat16).requires_grad_(),) + small()

    spec = GRPOObjective(**kw)
    eager = counted_peak(lambda *a: fused_linear_grpo_loss_ref(*a, objective=spec), linear_in)
    ours = counted_peak(lambda *a: fused_linear_grpo_loss_impl(*a, use_triton=True, objective=spec), linear_in)
    assert ours * 8 <= eager, (ours / 1e9, eager / 1e9)
    d_logits = n * V * 2
    eager = counted_peak(lambda *a: grpo_loss_ref(*a, objective=spec), logits_in)
    ours = counted_peak(lambda *a: triton_grpo_loss(*a, **kw), logits_in)
    assert d_logits <= ours <= 1.01 * d_logits and ours * 8 <= eager, (ours / 1e9, eager / 1e9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("chunk_tokens", [0, 5])  # one chunk (d(weight) written directly) or three (accumulated)
def test_fused_linear_objective_one_pass_matches_reference(dtype, use_triton, chunk_tokens):
    from r1cli.kernels.fused_linear import fused_linear_grpo_objective_impl

    g = torch.Generator().manual_seed(10)
    n, H, V = 13, 32, 1000
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax(hidden.float() @ weight.float().t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    old, ref = logp + 0.3 * torch.randn(n, generator=g), logp + 0.2 * torch.randn(n, generator=g)
    adv, mask = torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.2).float()
    w = torch.rand(n, generator=g)  # any aggregation weights
    kw = dict(objective=GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k2", temperature=0.8,
                                      entropy_coef=0.01, dual_clip=3.0))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    obj, per_tok, rec = fused_linear_grpo_objective_impl(h1, w1, targets, old, ref, adv, mask, w, use_triton=use_triton,
                                                         chunk_tokens=chunk_tokens, **kw)
    (2.5 * obj).backward()  # the incoming gradient scales what the forward formed
    ref_obj, ref_tok, ref_rec = kernels.fused_linear_grpo_objective(h2, w2, targets, old, ref, adv, mask, w,
                                                                    impl="torch", **kw)
    (2.5 * ref_obj).backward()
    tol = TOL[dtype]
    torch.testing.assert_close(obj, ref_obj, **tol)
    torch.testing.assert_close(per_tok, ref_tok, **tol)
    torch.testing.assert_close(rec.kl, ref_rec.kl, **tol)
    torch.testing.assert_close(rec.entropy[mask.bool()], ref_rec.entropy[mask.bool()], **tol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), **tol)


def _consistent_bf16(hidden, weight, targets, temperature):
    """The reference under mixed precision: every vocabulary GEMM in bf16 (forward and, by autograd, backward),
    the softmax in fp32 over those bf16 logits."""
    z = (hidden.bfloat16() @ weight.bfloat16().t()).float() / temperature
    return torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("path", ["recompute", "one_pass", "one_pass_single_chunk"])
def test_fused_linear_under_bf16_autocast_is_consistent(path, use_triton):
    """The trainer's forward runs under bf16 autocast over fp32 weights; the backward runs outside it. Both fused
    paths must compute every vocabulary GEMM in the forward's dtype: logits recomputed in fp32 against a bf16
    log-sum-exp made the backward's probabilities sum to 0.98-1.04 and d(hidden) 2.5% off; with a single token chunk
    the one-pass d(weight) matmul raised on its fp32 `out`."""
    g = torch.Generator().manual_seed(0)
    n, H, V, T = 48, 32, 700, 0.9
    hidden = (torch.randn(n, H, generator=g) * 2).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    coef = torch.randn(n, generator=g)
    ref = _consistent_bf16(hidden, weight, targets, T)
    ref_h, ref_w = torch.autograd.grad((ref * coef).sum(), [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "recompute":
            logp, _ = fused_linear_logprobs_impl(hidden, weight, targets, temperature=T, chunk_tokens=16,
                                                 chunk_vocab=256, use_triton=use_triton)
            value = (logp * coef).sum()
        else:
            from r1cli.kernels.fused_linear import fused_linear_weighted_loss_impl
            from r1cli.kernels.records import TokenRecord

            def per_token(lp, ent, a, b):
                zero = torch.zeros_like(lp)
                return lp, TokenRecord(lp.detach(), zero, zero, None)

            value, _, rec = fused_linear_weighted_loss_impl(
                hidden, weight, targets, coef, per_token, temperature=T,
                chunk_tokens=n if path == "one_pass_single_chunk" else 16, use_triton=use_triton)
            logp = rec.logp
    got_h, got_w = torch.autograd.grad(value, [hidden, weight])
    assert _rel(logp, ref) < 2e-3
    assert got_h.dtype == hidden.dtype and got_w.dtype == weight.dtype
    assert _rel(got_h, ref_h) < 5e-3 and _rel(got_w, ref_w) < 5e-3, (_rel(got_h, ref_h), _rel(got_w, ref_w))
