"""One GRPO step's time, side by side in one process, two comparisons:

old-pass (default): the same config run with grpo.old_logprobs=recompute (a no-grad forward over the step's samples
before the update) and auto (left out when the update is on-policy, as here with mu 1 and one mini-batch),
interleaved, median of each. Prints s/step split into generating and training and their ratios.

    python benchmarks/rl_step.py --config configs/tiny/zero.yaml model.path=... data.train=... [--steps 6]
    python benchmarks/rl_step.py --config configs/smollm2/rl.yaml --steps 3 --repeat 1

async: synchronous against rollout.asynchronous (step k+1 generated in a thread while step k trains): wall
seconds a step and completion tokens a second.

    OMP_NUM_THREADS=1 python benchmarks/rl_step.py --compare async --config configs/tiny/zero.yaml model.path=...

packing: the training half of a step (the reference log-probs and one GRPO update) on a long-tailed mix of
completion lengths (log-normal, capped at rollout.max_new_tokens), with train.micro_batch_size padded rows against
train.max_tokens_per_micro_batch packed ones (default: the longest prompt + completion). Prints tokens, forward
tokens with padding, s/step and tokens/s.

    python benchmarks/rl_step.py --compare packing --config configs/smollm2/rl.yaml [--samples 32]

fully-async: the synchronous loop, the one-step-off thread and the rollout worker process (rollout.max_staleness)
on a long-tailed mix (a tenth of the prompts ask for ~8x longer answers), each from the same cold start: completion
tokens/s and the held-out accuracy after the same samples (95% interval).

    python benchmarks/rl_step.py --compare fully-async --config configs/tiny/zero.yaml --steps 40 \
        rollout.max_new_tokens=192 [--staleness 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path


def run_steps(config: str, overrides: list[str], steps: int, out: Path) -> list[dict]:
    """The step metrics of a short run (no held-out evaluation, checkpoint or export), the first step left out."""
    from r1cli.config import load_config
    from r1cli.rl.loop import run_rl
    from r1cli.run.metrics import read_metrics

    cfg = load_config(config, [*overrides, f"train.steps={steps}", "data.eval=", f"train.output_dir={out}",
                               "logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0",
                               "checkpoint.export_hf=false", "checkpoint.every=0"])
    run_rl(cfg, overwrite=True)
    return [m for m in read_metrics(out / "metrics.jsonl") if "time/train_s" in m]


def one_run(config: str, overrides: list[str], mode: str, steps: int, out: Path) -> tuple[float, float]:
    rows = run_steps(config, [*overrides, f"grpo.old_logprobs={mode}"], steps, out)[1:]  # the first warms up
    return (statistics.median(m["time/generate_s"] for m in rows), statistics.median(m["time/train_s"] for m in rows))


def compare_async(a) -> None:
    """Synchronous against rollout.asynchronous (with TIS): wall seconds a step (between consecutive steps' log
    lines, so that the overlap counts), completion tokens a second, and the time each half took."""
    from r1cli.config import load_config

    cfg = load_config(a.config, a.overrides)
    samples = cfg.grpo.prompts_per_step * cfg.rollout.n
    modes = {"sync": [], "async": ["rollout.asynchronous=true", f"rollout.tis_cap={a.tis_cap}"]}
    found: dict[str, list] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeat):
            for m, extra in modes.items():
                rows = run_steps(a.config, [*a.overrides, *extra], a.steps, Path(tmp) / f"{m}{r}")[1:]
                walls = [b["time"] - p["time"] for p, b in zip(rows, rows[1:])]
                tokens = statistics.mean(b["response_len/mean"] for b in rows[1:]) * samples
                med = lambda key: statistics.median(b[key] for b in rows)  # noqa: E731
                found[m].append((statistics.median(walls), tokens, med("time/generate_s"), med("time/train_s")))
    print(f"{'':<8}{'step s':>8}{'tokens/s':>10}{'generate s':>12}{'train s':>9}")
    med = {}
    for m, runs in found.items():
        wall, tokens, gen, train = (statistics.median(x[i] for x in runs) for i in range(4))
        med[m] = tokens / wall
        print(f"{m:<8}{wall:>8.3f}{tokens / wall:>10.0f}{gen:>12.3f}{train:>9.3f}")
    print(f"async / sync completion tokens/s: {med['async'] / med['sync']:.2f}x")


def long_tailed_mix(folder: Path, n: int, held: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic additions where a tenth of the prompts ask for answers about 8x longer: 2-digit sums (about 20
    tokens of worked columns) and, every tenth row, 16-digit ones (about 150), with half the cold-start answers
    wrong (the R1-Zero demo's noise)."""
    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate, split_held_out

    short = generate("arithmetic", n, seed=seed, digits=2, ops="+", answer_noise=0.5)
    long = generate("arithmetic", n // 9 + held // 9 + 1, seed=seed + 1, digits=16, ops="+", answer_noise=0.5)
    rows = [long.pop() if i % 10 == 9 else short.pop() for i in range(n + held)]
    train, ev = split_held_out(rows, held)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(ev, folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


def compare_fully_async(a) -> None:
    """The synchronous loop, the one-step-off thread (rollout.asynchronous) and the rollout worker process
    (rollout.max_staleness) on the long-tailed mix, from one cold start: completion tokens a second over the steps
    (wall time between the first and the last step's log lines) and the held-out accuracy after the same samples,
    with a 95% interval (normal approximation over the held-out samples)."""
    import math

    from r1cli.config import load_config
    from r1cli.models.tiny import build_tiny_model
    from r1cli.rl.loop import run_rl
    from r1cli.run.metrics import read_metrics
    from r1cli.sft.loop import run_sft

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train, ev = long_tailed_mix(d, 4000, 200)
        model = build_tiny_model(d / "tiny")
        run_sft(load_config("configs/tiny/sft.yaml", [f"model.path={model}", f"data.train={train}", "data.eval=",
                                                       f"train.output_dir={d / 'sft'}", "logging.progress=false",
                                                       "logging.tensorboard=false", "data.max_seq_len=512"]))
        common = [f"model.path={d / 'sft' / 'hf'}", f"data.train={train}", f"data.eval={ev}", *a.overrides]
        modes = {"sync": [], "one-step-off": ["rollout.asynchronous=true", f"rollout.tis_cap={a.tis_cap}"],
                 "fully-async": [f"rollout.max_staleness={a.staleness}", f"rollout.tis_cap={a.tis_cap}"],
                 "fully+partial": [f"rollout.max_staleness={a.staleness}", f"rollout.tis_cap={a.tis_cap}",
                                   "rollout.partial=true"]}
        print(f"{'':<14}{'steps':>6}{'tokens/s':>10}{'wall s':>8}{'generate s':>11}{'train s':>8}{'waited':>7}"
              f"{'held-out':>10}{'95% interval':>18}")
        rate = {}
        for m, extra in modes.items():
            out = d / m
            cfg = load_config(a.config, [*common, *extra, f"train.steps={a.steps}", f"train.output_dir={out}",
                                         "logging.progress=false", "logging.tensorboard=false",
                                         "logging.sample_every=0", "checkpoint.export_hf=false", "eval.every=0"])
            run_rl(cfg, overwrite=True)
            rows = read_metrics(out / "metrics.jsonl")
            steps = [r for r in rows if "loss" in r]
            samples = cfg.grpo.prompts_per_step * cfg.rollout.n
            wall = steps[-1]["time"] - steps[0]["time"]
            tokens = sum(r["response_len/mean"] * samples for r in steps[1:])
            acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1]
            k = cfg.eval.samples * cfg.eval.n
            half = 1.96 * math.sqrt(acc * (1 - acc) / k)
            rate[m] = tokens / wall
            med = lambda key: statistics.median(r.get(key, 0.0) for r in steps[1:])  # noqa: E731
            print(f"{m:<14}{len(steps):>6}{rate[m]:>10.0f}{wall:>8.1f}{med('time/generate_s'):>11.2f}"
                  f"{med('time/train_s'):>8.2f}{med('time/rollout_wait_s'):>7.2f}{acc:>10.3f}"
                  f"{f'[{acc - half:.3f}, {acc + half:.3f}]':>18}", flush=True)
        print("completion tokens/s against sync: " + ", ".join(f"{m} {r / rate['sync']:.2f}x"
                                                              for m, r in rate.items() if m != "sync"))


def compare_old_pass(a) -> None:
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


def long_tailed_batch(samples: int, vocab: int, max_new: int, seed: int = 0):
    """GRPO rows: 40-token prompts and log-normal completion lengths (median max_new / 8, capped at max_new), with
    advantages, a mask and old log-probs of 0 (the ratio is then exp(logp): any value serves a timing)."""
    import torch

    from r1cli.token_batch import TokenBatch

    rng = random.Random(seed)
    lengths = [max(1, min(max_new, int(rng.lognormvariate(0, 1.0) * max_new / 8))) for _ in range(samples)]
    batch = TokenBatch.from_completions([[rng.randrange(vocab) for _ in range(40)] for _ in lengths],
                                        [[rng.randrange(vocab) for _ in range(n)] for n in lengths])
    mask = batch.scored_mask()
    batch.fields.update(advantages=torch.randn(samples, generator=torch.Generator().manual_seed(seed)),
                        loss_weight=torch.ones(samples), mask=mask, old_logp=torch.zeros_like(mask))
    return batch, lengths


def forward_tokens(trainer, batch) -> int:
    """Tokens the forwards process, padding included."""
    return sum(trainer._tensors(batch.select(rows))[0].numel() for rows in trainer._micro_batches(batch))


def compare_packing(a) -> None:
    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer
    from r1cli.rl.objective import GRPOLoss, GRPOObjective

    base = load_config(a.config, [*a.overrides, "train.device=cpu"])
    budget = a.budget or 40 + base.rollout.max_new_tokens
    modes = {"padded": ["train.max_tokens_per_micro_batch=0"], "packed": [f"train.max_tokens_per_micro_batch={budget}"]}
    trainers, times = {}, {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for m, extra in modes.items():
            cfg = load_config(a.config, [*a.overrides, "train.device=cpu", f"train.output_dir={tmp}/{m}", *extra])
            trainers[m] = build_trainer(cfg, need_reference=False)
        vocab = trainers["padded"].model.config.vocab_size
        batch, lengths = long_tailed_batch(a.samples, vocab, base.rollout.max_new_tokens)
        objective = GRPOObjective(temperature=base.rollout.temperature)
        mask = batch.fields["mask"]
        for r in range(a.repeat + 1):  # the first round warms up
            for m, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.logprobs(batch)  # the reference / old-policy pass
                trainer.train_step(batch, GRPOLoss(objective, len(batch), float(mask.sum())))
                if r:
                    times[m].append(time.perf_counter() - t0)
        tokens = sum(len(r) for r in batch.input_ids)
        print(f"{a.samples} samples: completions of {min(lengths)}..{max(lengths)} tokens (median "
              f"{statistics.median(lengths):.0f}) after 40-token prompts, {tokens} tokens; padded: "
              f"train.micro_batch_size={base.train.micro_batch_size} rows, packed: micro-batches of <= {budget} "
              "tokens; "
              f"one log-prob pass + one GRPO update, median of {a.repeat}")
        print(f"{'':<8}{'forwards':>9}{'fwd tokens':>12}{'padding':>9}{'s/step':>9}{'tokens/s':>10}")
        rate = {}
        for m, trainer in trainers.items():
            fwd, s = forward_tokens(trainer, batch), statistics.median(times[m])
            rate[m] = tokens / s
            print(f"{m:<8}{len(trainer._micro_batches(batch)):>9}{fwd:>12}{1 - tokens / fwd:>9.1%}{s:>9.2f}"
                  f"{rate[m]:>10.0f}")
        print(f"packed / padded tokens/s: {rate['packed'] / rate['padded']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--compare", choices=["old-pass", "packing", "async", "fully-async"], default="old-pass")
    ap.add_argument("--staleness", type=int, default=1, help="fully-async: rollout.max_staleness")
    ap.add_argument("--tis-cap", type=float, default=2.0, help="async: rollout.tis_cap of the asynchronous run")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="packing: samples in the step")
    ap.add_argument("--budget", type=int, default=0, help="packing: tokens per packed row (0: the longest row)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    import torch

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads; {a.config} {' '.join(a.overrides)}")
    if a.compare == "packing":
        compare_packing(a)
    elif a.compare == "fully-async":
        print(f"{a.steps} steps each, from one cold start on additions where a tenth of the prompts ask for ~8x "
              "longer answers")
        compare_fully_async(a)
    elif a.compare == "async":
        print(f"{a.steps} steps (the first left out) x {a.repeat} runs each, interleaved")
        compare_async(a)
    else:
        print(f"{a.steps} steps (the first left out) x {a.repeat} runs each, interleaved")
        compare_old_pass(a)


if __name__ == "__main__":
    main()
