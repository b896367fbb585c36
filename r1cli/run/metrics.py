"""Where a run's numbers go: metrics.jsonl, TensorBoard, and a rich progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class MetricsLog:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, fresh: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh and self.path.exists():
                self.path.unlink()  # a new run does not append to an old run's curve
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint we continue from."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepProgress:
    """A progress bar whose description carries the figures a user watches."""

    def __init__(self, total: int, start: int, enabled: bool, keys: list[tuple[str, str]]):
        self.keys = keys  # (metric name, short label)
        self.enabled = enabled
        self._p = None
        if enabled:
            self._p = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[figures]}"),
                console=console, transient=False,
            )
            self._task = self._p.add_task("train", total=total, completed=start, figures="")
            self._p.start()

    def update(self, step: int, values: dict) -> None:
        if not self._p:
            return
        parts = []
        for name, label in self.keys:
            v = values.get(name)
            if isinstance(v, float):
                parts.append(f"{label} {v:.4g}")
        self._p.update(self._task, completed=step, figures="  ".join(parts))

    def close(self) -> None:
        if self._p:
            self._p.stop()
