"""One GRPO step's time with and without the old policy's log-prob pass, side by side in one process: the same
config run with grpo.old_logprobs=recompute (a no-grad forward over the step's samples before the update) and
auto (left out when the update is on-policy, as here with mu 1 and one mini-batch), interleaved, median of each.

    python benchmarks/rl_step.py --config configs/tiny/zero.yaml model.path=... data.train=... [--steps 6]
    python benchmarks/rl_step.py --config configs/smollm2/rl.yaml --steps 3 --repeat 1

Prints s/step split into generating and training (log-probs + optimizer steps) and their ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path


def one_run(config: str, overrides: list[str], mode: str, steps: int, out: Path) -> tuple[float, float]:
    from r1cli.config import load_config
    from r1cli.rl.loop import run_rl
    from r1cli.run.metrics import read_metrics

    cfg = load_config(config, [*overrides, f"grpo.old_logprobs={mode}", f"train.steps={steps}", "data.eval=",
                               f"train.output_dir={out}", "logging.progress=false", "logging.tensorboard=false",
                               "logging.sample_every=0", "checkpoint.export_hf=false", "checkpoint.every=0"])
    run_rl(cfg, overwrite=True)
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "time/train_s" in m][1:]  # the first step warms up
    return (statistics.median(m["time/generate_s"] for m in rows), statistics.median(m["time/train_s"] for m in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    import torch

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads; {a.config} {' '.join(a.overrides)}; {a.steps} steps "
          f"(the first left out) x {a.repeat} runs each, interleaved")
    times: dict[str, list[tuple[float, float]]] = {"recompute": [], "auto": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeat):
            for mode in times:
                times[mode].append(one_run(a.config, a.overrides, mode, a.steps, Path(tmp) / f"{mode}{r}"))
    med = {m: (statistics.median(g for g, _ in v), statistics.median(t for _, t in v)) for m, v in times.items()}
    print(f"{'old log-probs':<16}{'generate s':>12}{'train s':>10}{'step s':>9}")
    for mode, (g, t) in med.items():
        print(f"{mode:<16}{g:>12.3f}{t:>10.3f}{g + t:>9.3f}")
    (g0, t0), (g1, t1) = med["recompute"], med["auto"]
    print(f"auto / recompute: train {t1 / t0:.3f}, step {(g1 + t1) / (g0 + t0):.3f}")


if __name__ == "__main__":
    main()
