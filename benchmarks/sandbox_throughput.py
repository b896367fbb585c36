"""How fast the sandbox scores code: the 164 HumanEval canonical solutions (all pass) and 164 empty bodies (all
fail), judged as r1 eval judges them (one sandboxed run each, answering its test's calls), from this process as it
is, after importing torch and transformers, and holding 2 GB of tensors as a trainer does - each program started
from a fork of the caller (`run_many`) and from the small launcher processes (`launch_many`, what r1 uses), side by
side.

    python benchmarks/sandbox_throughput.py
"""

from __future__ import annotations

import os
import platform
import time


def score_sets() -> list[tuple[str, str, int, int, float]]:
    """Each problem judged as r1 eval judges it (r1cli.sandbox.harness: one sandboxed run answering the test's
    calls, the test here)."""
    from r1cli.eval.benchmarks import call_test, humaneval_problems
    from r1cli.sandbox import Limits, run_many
    from r1cli.sandbox.harness import judge_many
    from r1cli.sandbox.launcher import launch_many

    problems = humaneval_problems()
    out = []
    limits = Limits(wall_s=10, cpu_s=6)
    for name, completion in (("canonical", lambda p: p.program["canonical_solution"]),
                             ("empty", lambda p: "    pass\n")):
        tests = [call_test(p, completion(p)) for p in problems]
        for how, run in (("fork of caller", run_many), ("launchers", launch_many)):
            t0 = time.perf_counter()
            verdicts = judge_many(tests, lambda jobs, run=run: run(jobs, limits))
            out.append((name, how, len(tests), sum(ok for ok, _ in verdicts), time.perf_counter() - t0))
    return out


def main() -> None:
    from r1cli.sandbox import isolation

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; isolation {isolation()}")
    print(f"{'caller':<30}{'set':<11}{'started by':<16}{'programs':>9}{'passed':>8}{'seconds':>9}{'programs/s':>12}")
    held = []
    for caller in ("plain", "torch + transformers", "torch + transformers + 2 GB"):
        if caller != "plain":
            import torch
            import transformers  # noqa: F401
        if caller.endswith("2 GB"):
            held.append(torch.ones(512 * 1024 * 1024))  # touched: resident, as a trainer's weights and states are
        rate = {}
        for name, how, n, ok, s in score_sets():
            rate[name, how] = n / s
            print(f"{caller:<30}{name:<11}{how:<16}{n:>9}{ok:>8}{s:>9.1f}{n / s:>12.0f}")
        print(f"{'':<30}launchers / fork of caller: " + ", ".join(
            f"{name} {rate[name, 'launchers'] / rate[name, 'fork of caller']:.2f}x" for name in ("canonical", "empty")))


if __name__ == "__main__":
    main()
