"""Sandboxed programs started from small launcher processes rather than from the caller.

Starting a program forks the process that asks for it; a trainer holding a model, an optimizer and gigabytes of
tensors pays for that fork in page tables - about 230 ms of a core a program (most of it system time) against
about 40 ms from a bare interpreter (`python benchmarks/sandbox_throughput.py`). During RL with tools or code rewards
that is most of a step. So the callers that run programs during training (the python tool, the code rewards,
`r1 eval`'s code benchmarks) hand them to a pool of launcher processes - forked from a fresh, small forkserver,
not from the trainer - each of which runs `run_program` as before: same limits, same verdicts.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from r1cli.sandbox.run import MAX_SLOTS, Limits, Result, not_enforced_here, run_many, run_program

_POOL: ProcessPoolExecutor | None = None
_LOCK = threading.Lock()


def _launcher_started(said: str) -> None:
    from r1cli.sandbox import run

    run._SAID["text"] = said  # the caller said it once: the launchers stay quiet


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            import multiprocessing as mp

            said = not_enforced_here()  # once, from the caller
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["r1cli.sandbox.run"])
            # launchers start when programs wait and stay: as many as programs run at once, at most MAX_SLOTS
            _POOL = ProcessPoolExecutor(max_workers=min(MAX_SLOTS, 4 * (os.cpu_count() or 1)), mp_context=ctx,
                                        initializer=_launcher_started, initargs=(said,))
        return _POOL


def launch(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """run_program(code, stdin, limits) from a launcher process; a launcher that dies is this program's "setup"
    verdict (and the next call starts fresh ones)."""
    global _POOL
    pool = _pool()
    try:
        return pool.submit(run_program, code, stdin, limits).result()
    except BrokenProcessPool as e:
        with _LOCK:
            if _POOL is pool:
                _POOL = None
        pool.shutdown(wait=False, cancel_futures=True)
        return Result("setup", None, "", "", f"the sandbox launcher died ({e})", 0.0)


def launch_many(jobs: list[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """(code, stdin) jobs, at most `workers` at once, results in order."""
    return run_many(jobs, limits, workers, runner=launch)
