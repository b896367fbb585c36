"""How fast the sandbox scores code: the 164 HumanEval canonical solutions (all pass) and 164 empty bodies (all
fail) through `run_many`, from this process as it is and after importing torch and transformers (each program
starts from a fork of the caller, so a larger caller costs more per program).

    python benchmarks/sandbox_throughput.py
"""

from __future__ import annotations

import os
import platform
import time


def score_sets() -> list[tuple[str, int, int, float]]:
    from r1cli.eval.benchmarks import humaneval_problems, program_jobs
    from r1cli.sandbox import Limits, run_many

    problems = humaneval_problems()
    out = []
    for name, completion in (("canonical", lambda p: p.program["canonical_solution"]),
                             ("empty", lambda p: "    pass\n")):
        jobs = [j for p in problems for j in program_jobs(p, completion(p))]
        t0 = time.perf_counter()
        results = run_many(jobs, Limits(wall_s=10, cpu_s=6))
        out.append((name, len(jobs), sum(r.ok for r in results), time.perf_counter() - t0))
    return out


def main() -> None:
    from r1cli.sandbox import isolation

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; isolation {isolation()}")
    print(f"{'caller':<22}{'set':<11}{'programs':>9}{'passed':>8}{'seconds':>9}{'programs/s':>12}")
    for caller in ("plain", "torch + transformers"):
        if caller != "plain":
            import torch  # noqa: F401
            import transformers  # noqa: F401
        for name, n, ok, s in score_sets():
            print(f"{caller:<22}{name:<11}{n:>9}{ok:>8}{s:>9.1f}{n / s:>12.0f}")


if __name__ == "__main__":
    main()
