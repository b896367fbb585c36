"""r1 rl against TRL's GRPOTrainer on the tiny R1-Zero run, matched settings, side by side; both judged by `r1 eval`.

    pip install 'r1[bench]'        # trl, an optional benchmark dependency
    python benchmarks/vs_trl.py --model runs/tiny-sft/hf --train runs/data/arith.jsonl \
        --eval runs/data/arith_eval.jsonl [--steps 80] [--threads 1] [--variants sync,async]

Both start from the same cold start, read the same prompts (r1's chat-templated token ids, handed to TRL as the text
they decode to and checked to re-tokenise to the same ids), score with the same rewards (r1's accuracy + 0.1 format,
as TRL reward functions), and take the same objective and optimiser: 32 prompts x 8 samples a step, temperature 1,
48 new tokens ending at EOS, seq-mean-token-mean GRPO (TRL loss_type "grpo", group std scaling), clip 0.2, no KL,
one update per batch, AdamW lr 3e-4 constant, betas (0.9, 0.95), no weight decay, gradient clip 1; like TRL, r1
generates the step's samples in one call and trains on them in one forward (rollout.prompts_per_generate=32,
train.micro_batch_size=256). Each run is its
own process with `--threads` torch threads. Printed: median wall seconds a step (the first left out), completion
tokens a second, and held-out pass@1 with its 95% bootstrap interval (`r1 eval`, 4 samples at temperature 1) before
and after. The r1 variants: sync (the default loop), async (rollout.asynchronous with TIS; it generates in a second
thread, so it runs two threads of `--threads` each), packed (train.max_tokens_per_micro_batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], threads: int) -> None:
    """A subprocess with `threads` torch threads, its output kept back unless it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
PROMPTS, N, MAX_NEW, LR = 32, 8, 48, 3e-4
R1_VARIANTS = {"sync": [], "async": ["rollout.asynchronous=true", "rollout.tis_cap=2.0"],
               "packed": ["train.max_tokens_per_micro_batch=4096"]}


def r1_run(a, variant: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "r1cli.cli", "rl", "--config", "configs/tiny/zero.yaml", f"model.path={a.model}",
           f"data.train={a.train}", "data.eval=", f"train.steps={a.steps}", f"train.output_dir={out}",
           "rollout.stop=[]", f"grpo.prompts_per_step={PROMPTS}", f"rollout.n={N}", f"rollout.max_new_tokens={MAX_NEW}",
           f"optim.lr={LR}", f"rollout.prompts_per_generate={PROMPTS}", f"train.micro_batch_size={PROMPTS * N}",
           "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
           "--overwrite", *R1_VARIANTS[variant]]
    _run(cmd, a.threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"time/train_s"' in line]
    walls = [b["time"] - p["time"] for p, b in zip(rows[1:], rows[2:])]
    tokens = [b["response_len/mean"] * PROMPTS * N for b in rows[2:]]
    return {"step_s": statistics.median(walls), "tokens_per_s": sum(tokens) / sum(walls), "hf": out / "hf"}


def trl_worker(a) -> None:
    """In its own process: TRL's GRPOTrainer on the same prompts, rewards and settings; writes times.json and hf/."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1cli.config import load_config
    from r1cli.data.prompts import encode_prompts
    from r1cli.data.records import read_data
    from r1cli.rewards import RewardContext, score

    torch.set_num_threads(a.threads)
    out = Path(a.trl_worker)
    cfg = load_config("configs/tiny/zero.yaml", [f"model.path={a.model}", f"data.train={a.train}"])
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = read_data(cfg.data.train, cfg.data, 0)
    ids = encode_prompts(tok, rows, cfg.data)
    texts = [tok.decode(p, skip_special_tokens=False) for p in ids]
    same = sum(tok(t, add_special_tokens=False)["input_ids"] == p for t, p in zip(texts, ids))
    assert same == len(ids), f"only {same} of {len(ids)} prompts re-tokenise to r1's ids"
    records = [dict(r) for r in rows]
    data = Dataset.from_list([{"prompt": t, "row": json.dumps(r)} for t, r in zip(texts, records)])
    ctx = RewardContext.from_config(cfg.data, cfg.rewards)

    def r1_rewards(prompts, completions, row, **_):
        return score(list(completions), [json.loads(r) for r in row], cfg.rewards.weights, ctx, 30.0).total

    times: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    args = GRPOConfig(output_dir=str(out / "trainer"), max_steps=a.steps, learning_rate=LR,
                      lr_scheduler_type="constant",
                      warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                      per_device_train_batch_size=PROMPTS * N, gradient_accumulation_steps=1, num_generations=N,
                      max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
                      loss_type="grpo", scale_rewards="group", num_iterations=1, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=False, disable_dropout=True,
                      remove_unused_columns=False, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=r1_rewards, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out / "hf"))
    tok.save_pretrained(str(out / "hf"))
    (out / "times.json").write_text(json.dumps({"times": times, "lengths": lengths}))


def trl_run(a, out: Path) -> dict:
    _run([sys.executable, __file__, "--model", str(a.model), "--train", str(a.train), "--eval", str(a.eval),
          "--steps", str(a.steps), "--threads", str(a.threads), "--trl-worker", str(out)], a.threads)
    rec = json.loads((out / "times.json").read_text())
    t, lengths = rec["times"], rec["lengths"]
    walls = [b - p for p, b in zip(t[1:], t[2:])]
    tokens = [n * PROMPTS * N for n in lengths[2:]]
    return {"step_s": statistics.median(walls), "tokens_per_s": sum(tokens) / sum(walls), "hf": out / "hf"}


def held_out(a, model: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # r1 eval keeps a folder's results for one model only
    _run([sys.executable, "-m", "r1cli.cli", "eval", "--model", str(model), "--benchmarks", f"jsonl={a.eval}",
          "--samples", "4", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", str(MAX_NEW), "--out",
          str(out), "benchmark.limit=100"], a.threads)
    return json.loads((out / "summary.json").read_text())["jsonl"]["pass@1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="sync,async")
    ap.add_argument("--work", type=Path, default=Path("runs/vs_trl"))
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model, a.train, a.eval = a.model.resolve(), a.train.resolve(), a.eval.resolve()
    if a.trl_worker:
        trl_worker(a)
        return
    import trl

    work = a.work.resolve()
    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.threads} torch "
          f"thread(s) a process; TRL {trl.__version__}; {a.steps} steps of {PROMPTS} prompts x {N} samples, "
          f"{MAX_NEW} new tokens")
    runs = {"trl": trl_run(a, work / "trl")}
    for v in a.variants.split(","):
        runs[f"r1 {v}"] = r1_run(a, v, work / f"r1-{v}")
    fmt = lambda m: f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"  # noqa: E731
    before = held_out(a, a.model, work / "eval-before")
    print(f"held-out pass@1 before: {fmt(before)}")
    print(f"{'':<10}{'step s':>8}{'tokens/s':>10}{'vs TRL':>8}  held-out after [95% CI]")
    for name, r in runs.items():
        after = held_out(a, r["hf"], work / f"eval-{name.replace(' ', '-')}")
        print(f"{name:<10}{r['step_s']:>8.3f}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / runs['trl']['tokens_per_s']:>7.2f}x  {fmt(after)}")


if __name__ == "__main__":
    main()
