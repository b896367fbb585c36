"""Where a run's numbers go: metrics.jsonl, TensorBoard, and a rich progress bar (plain lines in a log)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1cli.data.records import write_jsonl
from r1cli.errors import R1Error
from r1cli.run.console import console
from r1cli.run.loggers import LOGGERS, finite_scalars


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and sample tables to samples.jsonl); hands the
    finite scalars and the tables to the loggers of logging.backends (r1cli.run.loggers)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, backends: list[str] | tuple[str, ...] = (),
                 fresh: bool = True, cfg=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.loggers: list = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:  # a new run does not append to an old run's curve
                self.path.unlink(missing_ok=True)
                self.samples_path.unlink(missing_ok=True)
            self.loggers = [LOGGERS.get(name)(run_dir, cfg, not fresh) for name in backends]

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint we continue from (and a torn last line)."""
        if not (self.enabled and self.path.is_file()):
            return
        write_jsonl([m for m in read_metrics(self.path) if m["step"] <= step], self.path)
        if self.samples_path.is_file():
            write_jsonl([m for m in read_metrics(self.samples_path) if m["step"] <= step], self.samples_path)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        scalars = finite_scalars(clean)
        for logger in self.loggers:
            logger.scalars(step, scalars)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """A table of sampled completions (prompt, completion, rewards, ...), one JSON line per row."""
        if not (self.enabled and rows):
            return
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        for logger in self.loggers:
            logger.samples(step, rows)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def read_metrics(path: str | Path, say=None) -> list[dict]:
    """Every logged line; a torn last line (a kill mid-write) is dropped, and said so. A bad line elsewhere is
    damage, not a kill: an error naming it."""
    lines = Path(path).read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i:]):
                raise R1Error(f"{path}:{i}: not a JSON line; the metrics file is damaged") from None
            (say or console.print)(f"{path}:{i}: dropped a torn last line (the run was stopped mid-write)")
    return out


class StepProgress:
    """A progress bar whose description carries the figures a user watches; where the output is not a
    terminal (a SLURM log), one plain line per logging step instead."""

    def __init__(self, total: int, start: int, enabled: bool, keys: list[tuple[str, str]], log_every: int = 1):
        self.keys = keys  # (metric name, short label)
        self.total, self.log_every = total, max(1, log_every)
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._p = None
        if enabled and console.is_terminal:
            self._p = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[figures]}"),
                console=console, transient=False,
            )
            self._task = self._p.add_task("train", total=total, completed=start, figures="")
            self._p.start()

    def _figures(self, values: dict) -> str:
        return "  ".join(f"{label} {values[name]:.4g}" for name, label in self.keys
                         if isinstance(values.get(name), float))

    def update(self, step: int, values: dict) -> None:
        if self._p:
            self._p.update(self._task, completed=step, figures=self._figures(values))
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.t0
            console.print(f"step {step}/{self.total}  {self._figures(values)}  [{elapsed:.0f} s]", highlight=False,
                          soft_wrap=True)

    def close(self) -> None:
        if self._p:
            self._p.stop()
            self._p = None
