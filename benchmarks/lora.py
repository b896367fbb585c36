"""Full fine-tuning against LoRA on one model, side by side in one process: what trains, the train step's time,
and the weight sync a rollout engine receives every RL step (the full tensors, or the adapters merged into the base
under the base's names, which is what r1 sends to vLLM's in-place reload and to an engine's own copy).

    python benchmarks/lora.py --model runs/smollm2 [--rank 16] [--rows 8] [--tokens 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: str, rank: int, rows: int, tokens: int, repeat: int) -> dict:
    import torch

    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer
    from r1cli.sft.loss import NLLLoss
    from r1cli.token_batch import TokenBatch

    lora = [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}"] if rank else []
    cfg = load_config(None, [f"model.path={model}", "train.device=cpu", f"train.micro_batch_size={rows}",
                             "train.output_dir=/tmp/r1-bench-lora", *lora])
    trainer = build_trainer(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (tokens // 4,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(0, vocab, (tokens - tokens // 4,), generator=g).tolist() for _ in range(rows)]
    batch = TokenBatch.from_completions(prompts, completions)
    loss = NLLLoss(rows * (tokens - tokens // 4))
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    step = _time(lambda: trainer.train_step(batch, loss), repeat)
    sync = _time(lambda: sum(t.numel() for _, t in trainer.named_weights()), repeat)
    optim = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for k, t in s.items()
                if k != "step")
    return {"trained": trained, "total": total, "step_s": step, "sync_s": sync, "adamw_bytes": optim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local Hugging Face folder")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import torch

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads; model {a.model}; {a.rows} rows x {a.tokens} tokens, fp32")
    full, lora = measure(a.model, 0, a.rows, a.tokens, a.repeat), measure(a.model, a.rank, a.rows, a.tokens, a.repeat)
    print(f"{'':<34}{'full':>14}{f'LoRA r={a.rank}':>14}{'LoRA / full':>13}")
    rows = [("trained parameters", "trained", "{:,}"), ("AdamW state (MB)", "adamw_bytes", "mb"),
            ("train step (s)", "step_s", "{:.3f}"), ("engine weight sync (s)", "sync_s", "{:.3f}")]
    for label, key, fmt in rows:
        f, l_ = full[key], lora[key]
        show = (lambda v: f"{v / 2**20:.1f}") if fmt == "mb" else fmt.format
        print(f"{label:<34}{show(f):>14}{show(l_):>14}{l_ / f:>13.3f}")


if __name__ == "__main__":
    main()
