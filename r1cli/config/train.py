"""train, optim, logging, checkpoint: the training loop's own settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1cli.config.fields import bounded


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"  # the run folder: checkpoints, metrics, config, the Hugging Face export (hf/)
    steps: int = bounded(100, 1)  # optimizer steps (RL: one per batch of prompts_per_step prompts)
    micro_batch_size: int = bounded(8, 1)  # rows per forward (packed rows when data.pack)
    # > 0: each forward takes samples of at most this many tokens in all instead of micro_batch_size padded rows,
    # laid back to back into rows as wide as its longest (Megatron: one row), positions restarting and attention
    # within each sample; first-fit decreasing by length, a longer sample alone. Long-tailed RL: far less padding
    # auto: the most the memory plan says one micro-batch's activations may take on this device (GPU: its memory
    # less the resident rows; CPU: the memory available), printed at start and logged as train/token_budget
    max_tokens_per_micro_batch: int | Literal["auto"] = bounded(0, 0)
    grad_accum: int = bounded(1, 1)  # micro-batches summed into one optimizer step (SFT)
    seed: int = 0  # seeds data order, sampling and initialisation (r1cli.seeds)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is one, else the CPU
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, reference elsewhere


@dataclass
class OptimConfig:
    lr: float = bounded(1e-5, 0.0)  # peak learning rate (AdamW)
    weight_decay: float = bounded(0.0, 0.0)  # AdamW's decoupled weight decay
    beta1: float = bounded(0.9, 0.0, 1.0)  # AdamW's first-moment decay
    beta2: float = bounded(0.95, 0.0, 1.0)  # AdamW's second-moment decay
    eps: float = bounded(1e-8, 0.0, above=True)  # AdamW's denominator epsilon
    warmup_steps: int = bounded(0, 0)  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up: cosine decay to min_lr_ratio x lr, or constant
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)  # the cosine schedule's last learning rate, as a share of lr
    grad_clip: float = bounded(1.0, 0.0)  # 0: off


@dataclass
class LoggingConfig:
    every: int = bounded(1, 1)  # log metrics every N steps
    # where scalars and sample tables go besides metrics.jsonl (always written): tensorboard, wandb, mlflow, jsonl
    # (r1cli.run.loggers; a plugin may register its own)
    backends: list[str] = field(default_factory=lambda: ["tensorboard"],
                                metadata={"registry": "r1cli.run.loggers:LOGGERS"})
    project: str = "r1"  # the W&B project / MLflow experiment
    tensorboard: bool = True  # false drops tensorboard from logging.backends
    progress: bool = True  # the rich progress bar (false in batch jobs: one line per logged step instead)
    sample_every: int = bounded(10, 0)  # print sampled completions every N steps (0: only step 0)
    samples_to_print: int = bounded(2, 0)  # completions printed each time


@dataclass
class CheckpointConfig:
    every: int = bounded(0, 0)  # 0: only at the end
    keep: int = bounded(2, 0)  # newest checkpoints kept; 0: all
    stop_after: int = bounded(0, 0)  # stop the run after this many steps (to test resume); 0: off
    # a checkpoint whenever this many minutes passed since the last one (besides `every`): a killed job loses at
    # most that much; 0: off. Under SLURM, scripts/slurm/launch.sh also sets R1_STOP_AT from the job's time limit:
    # the run checkpoints and stops (exit 75, requeued) when the next step and checkpoint would not fit before it
    every_minutes: float = bounded(0.0, 0.0)
    export_hf: bool = True  # write a Hugging Face folder (hf/) at the end of the run
