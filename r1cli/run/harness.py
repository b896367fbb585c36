"""What every training command shares around its loop: the run folder, merged config, metrics,
progress bar, resume, periodic held-out evaluation and checkpoints, and the final save and export.

A loop reads:  harness = RunHarness(...); for step in range(harness.start, steps): ...;
if harness.step_done(step + 1, metrics): return harness.stopped(metrics); return harness.finish(metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from r1cli.config import Config, save_config
from r1cli.run import checkpoint as ckpt
from r1cli.run.metrics import MetricsLog, StepProgress, console


class RunHarness:
    def __init__(self, cfg: Config, trainer, *, resume: bool, progress_keys: list[tuple[str, str]],
                 evaluate: Callable[[], dict] | None = None, eval_before: bool = False):
        """`evaluate` returns held-out metrics (it runs on every rank); with `eval_before` a fresh run scores
        the starting model as step 0."""
        self.cfg, self.trainer, self.evaluate = cfg, trainer, evaluate
        self.parallel = trainer.parallel
        self.run_dir = Path(cfg.train.output_dir)
        if self.parallel.is_main:
            save_config(cfg, self.run_dir)
        self.log = MetricsLog(self.run_dir, self.parallel.is_main, cfg.logging.tensorboard, fresh=not resume)
        self.start = 0
        if resume:
            self.start = trainer.load(ckpt.require_latest(self.run_dir))["step"]
            self.log.truncate_after(self.start)
            self.print(f"resumed from step {self.start}")
        elif eval_before and evaluate is not None:
            self.log.log(0, evaluate())
        self.bar = StepProgress(cfg.train.steps, self.start, self.parallel.is_main and cfg.logging.progress,
                                progress_keys)

    def print(self, text: str) -> None:
        if self.parallel.is_main:
            console.print(text)

    def step_done(self, step: int, metrics: dict) -> bool:
        """After step `step` (1-based): log, progress, periodic evaluation and checkpoint; True when
        checkpoint.stop_after says the run stops here."""
        steps, every = self.cfg.train.steps, self.cfg.eval.every
        if step % self.cfg.logging.every == 0 or step == steps:
            self.log.log(step, metrics)
        self.bar.update(step, metrics)
        if self.evaluate is not None and every and step % every == 0 and step < steps:  # the last one: finish()
            self.log.log(step, self.evaluate())
        return ckpt.save_if_due(self.trainer, self.run_dir, self.cfg.checkpoint, step, steps)

    def stopped(self, last: dict) -> dict:
        self.bar.close()
        self.log.close()
        return {"stopped_at": self.cfg.checkpoint.stop_after, **last}

    def finish(self, last: dict) -> dict:
        """The final checkpoint, held-out evaluation and Hugging Face export; a one-line summary."""
        steps = self.cfg.train.steps
        self.bar.close()
        ckpt.save(self.trainer, self.run_dir, steps, self.cfg.checkpoint.keep)
        result = dict(last)
        if self.evaluate is not None:
            ev = self.evaluate()
            self.log.log(steps, ev)
            result.update(ev)
        if self.cfg.checkpoint.export_hf:
            self.trainer.export_hf(self.run_dir / "hf")
        self.log.close()
        self.print(f"done: {self.run_dir}  " + "  ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                          if isinstance(v, float)))
        return result
