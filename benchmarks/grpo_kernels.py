"""GRPO loss kernels side by side: eager torch, torch.compile, Liger-Kernel (when installed), ours.

Forward + backward time and peak memory, one run, printed as a table with ratios to ours.
Loss from logits is bandwidth-bound: its floor is 6*N*V bytes (read the bf16 logits twice
and write d(logits) once), reported as TB/s against the H100's 3.35 TB/s. The fused linear
form is compute-bound: 8*N*H*V flops (forward logits, recomputed logits, d(hidden),
d(weight)), reported as TFLOP/s against 989 dense bf16 TFLOP/s.

    python benchmarks/grpo_kernels.py                      # H100/H200: the full table
    python benchmarks/grpo_kernels.py --smoke              # any machine: tiny shapes, checks it runs
    python benchmarks/grpo_kernels.py --sweep --tokens 16384 --vocab 151936   # GPU: pick the launch settings
    python benchmarks/grpo_kernels.py --memory             # any machine: counted tensor peak at full shapes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r1cli.kernels.ops import fused_linear_grpo_loss, fused_linear_grpo_objective, grpo_loss
from r1cli.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref
from r1cli.rl.objective import GRPOObjective

H100_TBPS, H100_TFLOPS = 3.35, 989.0
KW = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", temperature=1.0)  # the Triton launcher's scalars
SPEC = GRPOObjective(**KW)  # the same objective as the spec the public functions take


def inputs(n, V, H, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, V, device=device, dtype=dtype, generator=g)
    hidden = torch.randn(n, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g) * H**-0.5
    targets = torch.randint(0, V, (n,), device=device, generator=g)
    old = -torch.rand(n, device=device, generator=g) * 5
    ref = old + 0.1 * torch.randn(n, device=device, generator=g)
    adv = torch.randn(n, device=device, generator=g)
    mask = torch.ones(n, device=device)
    return logits, hidden, weight, targets, old, ref, adv, mask


def measure(fn, device, reps):
    """Median fwd+bwd seconds and peak memory (bytes above the inputs)."""
    for _ in range(2):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times), torch.cuda.max_memory_allocated() - base
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), float("nan")


def measure_or_oom(fn, device, reps):
    """measure(), or (inf, inf) when the contender does not fit in GPU memory (eager at large N)."""
    try:
        return measure(fn, device, reps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("inf"), float("inf")


def logits_variants(x, targets, old, ref, adv, mask):
    def run(f):
        def go():
            leaf = x.detach().requires_grad_()
            loss, _ = f(leaf, targets, old, ref, adv, mask, objective=SPEC)
            loss.sum().backward()
        return go

    out = {"eager torch": run(grpo_loss_ref)}
    if x.device.type == "cuda":
        out["torch.compile"] = run(torch.compile(grpo_loss_ref))
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger

        padded = torch.cat([x, x[:1]]).unsqueeze(0)  # Liger takes [B, L+1, V] and drops the last position

        def liger_go():
            leaf = padded.detach().requires_grad_()
            res = liger(leaf, old[None], ref[None], targets[None], adv[:1].expand(1), mask[None], temperature=1.0,
                        beta=KW["beta"], eps_low=KW["eps_low"], eps_high=KW["eps_high"], inplace=True)
            loss = res[0] if isinstance(res, tuple) else res
            loss.sum().backward()

        out["Liger"] = liger_go
    except ImportError:
        pass
    # as Liger: d(logits) in place
    out["r1 (ours)"] = run(lambda *a, **k: grpo_loss(*a, impl="auto", inplace=True, **k))
    return out


def linear_variants(hidden, weight, targets, old, ref, adv, mask, seq_len):
    def run(f):
        def go():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss, _ = f(h, w, targets, old, ref, adv, mask, objective=SPEC)
            loss.sum().backward()
        return go

    out = {"eager torch": run(fused_linear_grpo_loss_ref)}
    if hidden.device.type == "cuda":
        out["torch.compile"] = run(torch.compile(fused_linear_grpo_loss_ref))
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=KW["beta"], epsilon_low=KW["eps_low"], epsilon_high=KW["eps_high"])

        # Liger chunks over sequences (one [seq_len, V] logits block at a time), so hand it the tokens as
        # N / seq_len responses rather than one N-token sequence, which would materialise all of [N, V]
        B = max(1, hidden.shape[0] // seq_len)
        L = hidden.shape[0] // B

        def liger_go():
            h, w = hidden[: B * L].detach().view(B, L, -1).requires_grad_(), weight.detach().requires_grad_()
            res = liger(h, w, targets[: B * L].view(B, L), mask[: B * L].view(B, L), adv[:B],
                        ref_per_token_logps=ref[: B * L].view(B, L), old_per_token_logps=old[: B * L].view(B, L))
            (res[0] if isinstance(res, tuple) else res).backward()

        out["Liger"] = liger_go
    except ImportError:
        pass
    out["r1 (ours)"] = run(lambda *a, **k: fused_linear_grpo_loss(*a, impl="auto", **k))
    token_w = torch.full_like(old, 1.0 / old.numel())  # token-mean weights: the gradient is formed in the forward
    out["r1 one pass"] = run(lambda *a, **k: fused_linear_grpo_objective(*a, token_w, impl="auto", **k)[::2])
    return out


def sweep(n, V, device, reps, smoke=False):
    """Each kernel alone under every launch setting: forward (loss from logits), tile statistics (fused linear,
    one 32768-column tile) and d(logits) in place. Prints GB/s per setting and the LAUNCH entry to keep."""
    from r1cli.kernels import grpo_logits
    from r1cli.kernels.fused_linear import VOCAB_TILE

    x, _, _, t, old, ref, adv, mask = inputs(n, V, 8, torch.bfloat16, device)
    tile = x[:, : min(V, VOCAB_TILE)].contiguous()
    f, ones = torch.zeros(n, device=device), torch.ones(n, device=device)  # g = 1: a row with g = 0 reads nothing
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04)
    jobs = {
        "fwd": (lambda: grpo_logits.triton_grpo_loss(x, t, old, ref, adv, mask, **kw), x.numel() * 2),
        "stats": (lambda: grpo_logits.tile_stats(tile, t, 0, 1.0, False), tile.numel() * 2),
        "grad": (lambda: grpo_logits.tile_grad(x, t, 0, f, f, ones, None, 1.0, out=x), x.numel() * 4),
    }
    grid = [(b, w, st) for b in (2048, 4096, 8192) for w in (1, 4, 8, 16) for st in (1, 3)]
    if smoke:
        grid = grid[:2]
    best = {}
    for kind, (fn, nbytes) in jobs.items():
        keep = dict(grpo_logits.LAUNCH[kind])
        print(f"\n{kind}: N={n} V={V} bf16, {nbytes / 1e9:.2f} GB moved")
        for b, w, st in grid:
            grpo_logits.LAUNCH[kind] = dict(block=b, num_warps=w, num_stages=st)
            with torch.no_grad():
                sec, _ = measure(fn, device, reps)
            print(f"  block={b:<5} warps={w:<3} stages={st}  {sec * 1e3:8.3f} ms  {nbytes / sec / 1e9:8.0f} GB/s")
            if kind not in best or sec < best[kind][0]:
                best[kind] = (sec, grpo_logits.LAUNCH[kind])
        grpo_logits.LAUNCH[kind] = keep
    print("\nfastest, for LAUNCH in kernels/grpo_logits.py:")
    for kind, (sec, cfg) in best.items():
        print(f'    "{kind}": dict(block={cfg["block"]}, num_warps={cfg["num_warps"]}, '
              f'num_stages={cfg["num_stages"]}),')


def memory_model(tokens, vocab, H):
    """Loss from logits and fused linear at the benchmark's shapes: counted tensor peak, eager vs ours."""
    from r1cli.kernels.fused_linear import fused_linear_grpo_loss_impl, fused_linear_grpo_objective_impl
    from r1cli.kernels.grpo_logits import triton_grpo_loss
    from r1cli.kernels.memcount import counted_peak

    print("counted tensor peak (FakeTensorMode, no GPU; excludes allocator and cuBLAS overhead), bf16, GB")
    print(f"{'shape':<30}{'eager':>9}{'ours':>9}{'eager/ours':>12}")
    for V in vocab:
        for n in tokens:
            def small():
                return (torch.randint(0, V, (n,)), -torch.rand(n), -torch.rand(n), torch.randn(n), torch.ones(n))

            def logits_in():
                return (torch.randn(n, V, dtype=torch.bfloat16).requires_grad_(),) + small()

            def linear_in():
                return (torch.randn(n, H, dtype=torch.bfloat16).requires_grad_(),
                        torch.randn(V, H, dtype=torch.bfloat16).requires_grad_()) + small()

            # d(logits) in a new buffer both ways
            e = counted_peak(lambda *a: grpo_loss_ref(*a, objective=SPEC), logits_in)
            o = counted_peak(lambda *a: triton_grpo_loss(*a, **KW), logits_in)
            print(f"{f'logits N={n} V={V}':<30}{e / 1e9:>9.2f}{o / 1e9:>9.2f}{e / o:>11.1f}x")
            e = counted_peak(lambda *a: fused_linear_grpo_loss_ref(*a, objective=SPEC), linear_in)
            o = counted_peak(lambda *a: fused_linear_grpo_loss_impl(*a, use_triton=True, objective=SPEC), linear_in)
            print(f"{f'linear N={n} H={H} V={V}':<30}{e / 1e9:>9.2f}{o / 1e9:>9.2f}{e / o:>11.1f}x")
            o = counted_peak(lambda *a: fused_linear_grpo_objective_impl(*a, torch.ones(n), use_triton=True,
                                                                         objective=SPEC),
                             linear_in)
            print(f"{'  one pass':<30}{'':>9}{o / 1e9:>9.2f}{e / o:>11.1f}x")


def table(title, rows, ours_key, extra_name, extra_fn):
    print(f"\n{title}")
    print(f"{'impl':<16}{'time ms':>10}{'peak MiB':>11}{'vs ours':>9}{extra_name:>12}")
    t_ours = rows[ours_key][0]
    for name, (t, mem) in rows.items():
        if t == float("inf"):
            print(f"{name:<16}{'out of memory':>21}")
            continue
        mib = mem / 2**20 if mem == mem else float("nan")
        print(f"{name:<16}{t * 1e3:>10.2f}{mib:>11.0f}{t / t_ours:>8.2f}x{extra_fn(t):>12.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--vocab", type=int, nargs="+", default=[151936, 152064])
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=1024, help="response length (Liger's fused linear chunks by it)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here")
    p.add_argument("--sweep", action="store_true", help="time the Triton launch settings and name the fastest")
    p.add_argument("--memory", action="store_true", help="count the tensor peak at full shapes, no GPU needed")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.tokens, args.vocab, args.hidden, args.reps, args.seq_len = [64], [1000], 64, 2, 16
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}   dtype: bf16   torch {torch.__version__}   date: {time.strftime('%Y-%m-%d')}")
    if args.memory:
        return memory_model(args.tokens, args.vocab, args.hidden)
    if args.sweep:
        return sweep(args.tokens[0], args.vocab[0], device, args.reps, smoke=args.smoke)
    for V in args.vocab:
        for n in args.tokens:
            x, h, w, t, old, ref, adv, mask = inputs(n, V, args.hidden, dtype, device)
            contenders = logits_variants(x, t, old, ref, adv, mask)
            rows = {k: measure_or_oom(f, device, args.reps) for k, f in contenders.items()}
            floor = 6 * n * V
            table(f"loss from logits  N={n} V={V}  (floor {floor / 1e9:.2f} GB, H100 {H100_TBPS} TB/s)", rows,
                  "r1 (ours)", "TB/s", lambda s: floor / s / 1e12)
            del x, contenders  # the closures hold the [N, V] logits too
            contenders = linear_variants(h, w, t, old, ref, adv, mask, args.seq_len)
            rows = {k: measure_or_oom(f, device, args.reps) for k, f in contenders.items()}
            flops = 8 * n * args.hidden * V
            table(f"fused linear  N={n} H={args.hidden} V={V}  ({flops / 1e12:.1f} TFLOP, H100 {H100_TFLOPS})", rows,
                  "r1 (ours)", "TFLOP/s", lambda s: flops / s / 1e12)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
