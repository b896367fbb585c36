"""What every training command shares around its loop: the run folder, merged config, metrics,
progress bar, resume, periodic held-out evaluation and checkpoints, a clean stop on SIGINT /
SIGTERM, and the final save and export.

A loop reads:

    check_run_dir(cfg, resume, overwrite)      # before any model loads
    with RunHarness(cfg, trainer, ...) as harness:
        for step in range(harness.start, cfg.train.steps):
            ...
            if harness.step_done(step + 1, metrics):
                return harness.stopped(metrics)
        return harness.finish(metrics)
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from r1cli.config import Config, save_config
from r1cli.errors import OUT_OF_TIME, R1Error, RunInterrupted
from r1cli.run import checkpoint as ckpt
from r1cli.run import identity
from r1cli.run.console import console
from r1cli.run.folder_lock import hold_on_rank0
from r1cli.run.metrics import MetricsLog, StepProgress

RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "tensorboard", "hf",
                 "hf-adapter", "wandb", "mlruns", "wandb_run_id", "mlflow_run_id", "identity.json")


def run_identity(cfg: Config) -> dict:
    """What a training run's results depend on (r1cli.run.identity): a --resume with other inputs is refused."""
    return identity.of_config(cfg, ["model", "data", "train", "optim", "grpo", "critic", "rewards", "rollout",
                                    "distill"],
                     {"model.path": cfg.model.path, "data.train": cfg.data.train,
                      "distill.teacher": cfg.distill.teacher, "critic.path": cfg.critic.path})


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Before any model loads: one process per run folder (a lock that dies with it), and a new run never lands on
    an earlier one by accident: it must be resumed or replaced explicitly. A folder whose run never reached its
    first step (no checkpoint, no logged step) is simply started again; --resume continues only a checkpoint made
    with the same inputs."""
    run_dir = Path(cfg.train.output_dir)
    if resume and overwrite:
        raise R1Error("--resume continues a run and --overwrite replaces it: give one of them")
    hold_on_rank0(run_dir, "train.output_dir")
    found = [name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    done = ckpt.completed(run_dir)
    started = bool(done) or _logged_steps(run_dir)
    if resume:
        latest, skipped = ckpt.latest(run_dir)
        if latest is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            then = ("start it again with --overwrite" if started else
                    "nothing was checkpointed there yet: run without --resume")
            raise R1Error(f"--resume: no intact checkpoint under {ckpt.checkpoint_root(run_dir)}{why}; {then}")
        record = run_dir / "identity.json"
        identity.check(record, run_identity(cfg), f"train.output_dir {run_dir}",
                       f"--overwrite starts it again, or set another train.output_dir (or delete {record} to continue "
                       "with the new inputs)")
    elif started and not overwrite:
        what = f"checkpoints up to {done[0].name}" if done else ", ".join(found)
        raise R1Error(f"train.output_dir {run_dir} already holds a run ({what}); continue it with --resume, "
                      "replace it with --overwrite, or set another train.output_dir")


def _logged_steps(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


class RunHarness:
    def __init__(self, cfg: Config, trainer, *, resume: bool, progress_keys: list[tuple[str, str]],
                 evaluate: Callable[[], dict] | None = None, eval_before: bool = False, overwrite: bool = False):
        """`evaluate` returns held-out metrics (it runs on every rank); with `eval_before` a fresh run scores
        the starting model as step 0."""
        self.cfg, self.trainer, self.evaluate = cfg, trainer, evaluate
        self.parallel = p = trainer.parallel
        self.run_dir = Path(cfg.train.output_dir)
        self.t0 = time.perf_counter()
        p.barrier()  # every rank has checked the folder (check_run_dir) before rank 0 changes it
        if not resume and p.is_main:  # --overwrite, or what a run that never reached its first step left
            for name in RUN_ARTIFACTS:
                target = self.run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        p.barrier()
        if p.is_main:
            if not resume:  # a fresh run records what its results depend on
                identity.write(self.run_dir / "identity.json", run_identity(cfg))
            save_config(cfg, self.run_dir)
        backends = [b for b in cfg.logging.backends if b != "tensorboard" or cfg.logging.tensorboard]
        self.log = MetricsLog(self.run_dir, p.is_main, backends, fresh=not resume, cfg=cfg)
        self.start, self.run_id = 0, uuid.uuid4().hex[:12]
        self.first_eval: dict = {}
        # loop state beyond the trainer's that a checkpoint keeps per rank: `carry()` gives it at a checkpoint,
        # `carried` holds what the resumed checkpoint kept (None: nothing)
        self.carry: Callable[[], object] | None = None
        self.carried: object = None
        if resume:
            found = ckpt.require_latest(self.run_dir, say=self.print)
            self.start = trainer.load(found)["step"]
            self.carried = ckpt.load_carry(found, p.rank)
            self.run_id = ckpt.run_id_of(found) or self.run_id
            self.log.truncate_after(self.start)
            self.print(f"resumed from step {self.start} ({found})")
        elif eval_before and evaluate is not None:
            self.first_eval = evaluate()
            self.log.log(0, self.first_eval)
        self.bar = StepProgress(cfg.train.steps, self.start, p.is_main and cfg.logging.progress, progress_keys,
                                log_every=cfg.logging.every)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        # wall-clock checkpoints (checkpoint.every_minutes) and the batch job's deadline (R1_STOP_AT, epoch seconds:
        # scripts/slurm/launch.sh sets it from the job's time limit)
        self.last_saved = self.last_step = time.time()
        self.save_s = 0.0  # how long the last checkpoint took to write
        self.stop_at = float(os.environ.get("R1_STOP_AT", "0") or 0)

    # ------------------------------------------------------------------ SIGINT / SIGTERM
    def __enter__(self) -> "RunHarness":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.bar.close()
        self.log.close()

    def _on_signal(self, signum, frame) -> None:
        """Finish the step in progress, checkpoint it and stop; a second signal acts at once."""
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                    "(send it again to stop at once)\n".encode())

    def print(self, text: str) -> None:
        if self.parallel.is_main:
            console.print(text, soft_wrap=True, highlight=False)  # one line in a log, however wide

    # ------------------------------------------------------------------ per step
    def step_done(self, step: int, metrics: dict) -> bool:
        """After step `step` (1-based): log, progress, periodic evaluation and checkpoint; True when
        checkpoint.stop_after says the run stops here. After SIGINT / SIGTERM: checkpoint and raise."""
        steps, every, c = self.cfg.train.steps, self.cfg.eval.every, self.cfg.checkpoint
        if step % self.cfg.logging.every == 0 or step == steps:
            self.log.log(step, metrics)
        self.bar.update(step, metrics)
        if self.evaluate is not None and every and step % every == 0 and step < steps:  # the last one: finish()
            self.log.log(step, self.evaluate())
        stop = bool(c.stop_after) and step == c.stop_after
        now = time.time()
        step_s, self.last_step = now - self.last_step, now
        # the next step and a checkpoint after it would end past the job's deadline: stop here, with a checkpoint
        late = bool(self.stop_at) and step < steps and now + step_s + max(self.save_s, step_s) > self.stop_at
        timed = bool(c.every_minutes) and now - self.last_saved >= 60 * c.every_minutes and step < steps
        # every rank stops (and saves) after the same step, even when a signal or its clock told them at different
        # moments
        interrupted = self.parallel.all_reduce_sum(float(self.signum is not None)) > 0
        late = self.parallel.all_reduce_sum(float(late)) > 0
        timed = self.parallel.all_reduce_sum(float(timed)) > 0
        if stop or interrupted or late or timed or (c.every and step % c.every == 0 and step < steps):
            t0 = time.time()
            saved = ckpt.save(self.trainer, self.run_dir, step, c.keep, self.run_id,
                              self.carry() if self.carry else None)
            self.last_saved, self.save_s = time.time(), time.time() - t0
            self.last_step += self.save_s
            if interrupted:
                signum = self.signum or signal.SIGTERM
                raise RunInterrupted(f"{signal.Signals(signum).name} after step {step}: checkpoint saved to {saved}; "
                                     "continue with --resume", int(signum))
            if late:
                raise RunInterrupted(f"stopping after step {step}, before the job's time limit (R1_STOP_AT): "
                                     f"checkpoint saved to {saved}; continue with --resume", 0, OUT_OF_TIME)
        if stop:
            self.print(f"stopped after step {step} (checkpoint.stop_after={c.stop_after}): checkpoint in "
                       f"{ckpt.checkpoint_root(self.run_dir)}; continue with --resume")
        return stop

    def stopped(self, last: dict) -> dict:
        return {"stopped_at": self.cfg.checkpoint.stop_after, **last}

    def finish(self, last: dict) -> dict:
        """The final checkpoint, held-out evaluation and Hugging Face export; a one-line summary."""
        steps = self.cfg.train.steps
        self.bar.close()
        ckpt.save(self.trainer, self.run_dir, steps, self.cfg.checkpoint.keep, self.run_id)
        result = dict(last)
        if self.evaluate is not None:
            ev = self.evaluate()
            self.log.log(steps, ev)
            result.update(ev)
        if self.cfg.checkpoint.export_hf:
            self.trainer.export_hf(self.run_dir / "hf")
        self.print(self.summary(result, steps))
        return result

    def summary(self, result: dict, steps: int) -> str:
        parts = [f"done: {steps - self.start} steps in {time.perf_counter() - self.t0:.0f} s"]
        if "eval/accuracy" in result:
            before = f"{self.first_eval['eval/accuracy']:.3f} -> " if "eval/accuracy" in self.first_eval else ""
            parts.append(f"held-out accuracy {before}{result['eval/accuracy']:.3f}")
        if "loss" in result:
            parts.append(f"final loss {result['loss']:.4g}")
        exported = " (Hugging Face export in hf/)" if self.cfg.checkpoint.export_hf else ""
        parts.append(f"run in {self.run_dir}{exported}")
        return "; ".join(parts)
