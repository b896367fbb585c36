"""Compile the GRPO kernels for a GPU that is not here (sm_90 by default) and report what the compiler made.

No GPU is needed: Triton lowers each kernel to PTX and its bundled `ptxas` assembles it
for the named target; `cuobjdump` and `nvdisasm` (shipped with Triton too) then report
registers, spilled (local) bytes, shared memory and the width of every global load and
store. The launches come from the real launchers: `record_launches` runs them with the
kernels swapped for recorders, so the signatures, specialisations and launch settings
compiled here are the ones a run on the GPU would use.

    python -m r1cli.kernels.aot            # table for sm_90 (H100 / H200)
    python -m r1cli.kernels.aot --arch 100 # another target

It needs the `triton` wheel's NVIDIA backend (Linux x86-64 or aarch64) and not TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32"}


@dataclass
class Launch:
    kernel: object  # triton.JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Report:
    name: str
    config: str
    registers: int
    local_bytes: int  # spills and stack; 0 for a kernel that keeps everything in registers
    shared_bytes: int
    global_loads: dict  # SASS load opcode -> count, e.g. {"LDG.E.128": 4}
    global_stores: dict


class _Recorder:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.launches is not None:
                self.launches.append(Launch(self.kernel, args, kwargs))
        return launch


@contextmanager
def record_launches(keep: bool = True):
    """Within the block, the Triton kernels of r1cli.kernels record their launches instead of running
    (keep=False: they do nothing, and hold no reference to their arguments -- for memory accounting)."""
    from . import grpo_logits

    launches: list[Launch] | None = [] if keep else None
    names = [n for n in dir(grpo_logits) if n.endswith("_kernel") and hasattr(getattr(grpo_logits, n), "fn")]
    patches = [mock.patch.object(grpo_logits, n, _Recorder(getattr(grpo_logits, n), launches)) for n in names]
    for p in patches:
        p.start()
    try:
        yield launches
    finally:
        for p in patches:
            p.stop()


def _signature(launch: Launch):
    """Triton's own specialisation: pointer/int types, 16-divisibility hints, constexprs; launch options apart."""
    fn = launch.kernel
    names = fn.arg_names
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in opts})
    constexpr_names = {names[i] for i in fn.constexprs}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # Triton turns an integer argument equal to 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot describe argument {name}={v!r}")
    return signature, constexprs, attrs, opts


def _tools():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_launch(launch: Launch, arch: int = 90) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs, opts = _signature(launch)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 64 if arch < 100 else 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": opts.get("num_warps", 4), "num_stages": opts.get("num_stages", 3)})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_tools(), "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_tools(), "nvdisasm"), cubin],
                              capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage))
    counts = Counter(re.findall(r"\b((?:LDG|STG)\.[A-Z0-9.]+)", sass))
    loads = {op: c for op, c in counts.items() if op.startswith("LDG")}
    stores = {op: c for op, c in counts.items() if op.startswith("STG")}
    shown = {k: v for k, v in constexprs.items() if k.isupper()}
    config = " ".join([f"{k}={v}" for k, v in shown.items()] + [f"w={options.num_warps}", f"s={options.num_stages}"])
    return Report(launch.name, config, int(res["REG"]), int(res["LOCAL"]) + int(res.get("STACK", 0)),
                  int(res["SHARED"]) + compiled.metadata.shared, loads, stores)


def production_launches(V: int = 151936, dtype=torch.bfloat16) -> list[Launch]:
    """The launches of one GRPO training step on a Qwen-sized vocabulary: loss from logits (with and without
    entropy, every KL estimator, the ppo and cispo policy losses), log-probs, and the fused-linear tile statistics
    and gradient."""
    from .fused_linear import VOCAB_TILE
    from .grpo_logits import _GRPOLossFromLogits, tile_grad, tile_stats

    n = 4
    logits = torch.zeros(n, V, dtype=dtype)
    t = torch.zeros(n, dtype=torch.int64)
    f = torch.zeros(n)
    with record_launches() as launches:
        for kl, ent, cispo in [("k1", False, False), ("k2", False, False), ("k3", False, False), ("k3", True, False),
                               ("k3", False, True)]:
            _GRPOLossFromLogits.forward(_Ctx(), logits, t, f, f, f, f, 0.2, 0.28, 0.04, kl, 1.0, 0.0,
                                        0.01 if ent else 0.0, 20.0, True, ent, False, cispo)
        _GRPOLossFromLogits.forward(_Ctx(), logits, t, None, None, None, None, 0.0, 0.0, 0.0, "k3", 1.0, 0.0, 0.0,
                                    20.0, False, False, False, False)
        tile = torch.zeros(n, min(V, VOCAB_TILE), dtype=dtype)
        for ent in (False, True):
            tile_stats(tile, t, 0, 1.0, ent)
            tile_grad(logits, t, 0, f, f, f, f if ent else None, 1.0, out=logits)
    return launches


class _Ctx:
    """Stands in for autograd's ctx when a Function's forward is called directly to record its launches."""

    def save_for_backward(self, *a):
        pass

    def mark_non_differentiable(self, *a):
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--json", action="store_true", help="one JSON report per line instead of the table")
    args = p.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch on the GPU uses; silences the warning
    import triton

    if args.json:
        for launch in production_launches(args.vocab):
            print(json.dumps(dataclasses.asdict(compile_launch(launch, args.arch))))
        return
    print(f"target sm_{args.arch}   triton {triton.__version__}   V={args.vocab}   bf16 logits")
    print(f"{'kernel':<18}{'config':<44}{'regs':>5}{'local B':>8}{'smem B':>8}  loads / stores (SASS)")
    for launch in production_launches(args.vocab):
        r = compile_launch(launch, args.arch)
        ls = " ".join(f"{k}x{v}" for k, v in sorted(r.global_loads.items()))
        ss = " ".join(f"{k}x{v}" for k, v in sorted(r.global_stores.items()))
        print(f"{r.name:<18}{r.config:<44}{r.registers:>5}{r.local_bytes:>8}{r.shared_bytes:>8}  {ls} / {ss}")


if __name__ == "__main__":
    main()
