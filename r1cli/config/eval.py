"""eval and benchmark: held-out evaluation during training, and r1 eval's benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

from r1cli.config.fields import bounded


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training: pass@1 as the mean over n samples per prompt."""

    every: int = bounded(0, 0)  # steps between evaluations; 0: only before and after training
    samples: int = bounded(64, 1)  # held-out rows used
    n: int = bounded(1, 1)  # samples per held-out prompt
    temperature: float = bounded(0.0, 0.0)  # 0: greedy
    top_p: float = bounded(1.0, 0.0, 1.0, above=True)  # nucleus sampling of the held-out evaluation
    max_new_tokens: int = bounded(256, 1)  # tokens per held-out completion


@dataclass
class BenchmarkConfig:
    """r1 eval: benchmarks scored by pass@1 (mean over `samples` per problem), cons@k and pass@k; the model is
    model.path, the prompt data.template / data.prefill, the engine rollout.engine and its sub-section."""

    benchmarks: list[str] = field(default_factory=list)  # NAME or NAME=PATH (aime24, math500, gsm8k, humaneval...)
    data_dir: str = ""  # folder with each benchmark's default file
    out: str = "runs/eval"  # samples.jsonl and summary.json
    completions: str = ""  # JSONL of existing {benchmark, id, completion} to score instead of generating
    samples: int = bounded(1, 1)  # k per problem
    temperature: float = bounded(0.6, 0.0)  # DeepSeek-R1's evaluation settings
    top_p: float = bounded(0.95, 0.0, 1.0, above=True)  # nucleus sampling (DeepSeek-R1's evaluation: 0.95)
    max_new_tokens: int = bounded(2048, 1)  # tokens per completion
    limit: int = bounded(0, 0)  # problems per benchmark; 0: all
    seed: int = 0  # seeds the sampling (the same seed, the same samples)
    code_workers: int = bounded(0, 0)  # sandbox pool size for code benchmarks; 0: twice the cores
