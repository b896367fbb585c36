"""Append-only output of a generate-and-filter command (r1 sample, r1 coldstart) that a restart continues exactly.

Beside the rows (`out`, JSONL) live `<out>.done`, one line per finished prompt (how many samples were drawn,
kept, and rejected by reason), and `<out>.stats.json`. Prompts go in fixed batches; a batch's rows are
appended and flushed before its prompts are marked done, and rows of a batch cut off before its marks are
dropped on restart, so a run killed at any point and started again writes exactly what an uninterrupted
run writes. Under torchrun each data-parallel rank takes every dp_size-th prompt into files of its own.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from r1cli.data.records import write_jsonl
from r1cli.run.checkpoint import write_text_atomic
from r1cli.run.metrics import console, read_metrics


def shard_path(path: Path, rank: int, size: int) -> Path:
    return path if size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _index_of(path: Path) -> Path:
    return path.with_name(path.name + ".done")


class ResumableOutput:
    """This rank's rows and finished-prompt index; `pending` gives the batches still to do."""

    def __init__(self, out: str | Path, parallel, overwrite: bool = False):
        self.root, self.parallel = Path(out), parallel
        self.path = shard_path(self.root, parallel.dp_rank, parallel.dp_size)
        self.index = _index_of(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.index.unlink(missing_ok=True)
        self.done = {r["source"] for r in read_metrics(self.index)} if self.index.is_file() else set()
        if self.path.is_file():  # rows of a batch whose prompts were never marked: that batch is redone
            rows = read_metrics(self.path)
            keep = [r for r in rows if r["source"] in self.done]
            if len(keep) < len(rows):
                write_jsonl(keep, self.path)

    def pending(self, n_prompts: int, per_batch: int) -> Iterator[list[int]]:
        """This rank's prompts in fixed batches (the same on every run), skipping finished batches."""
        mine = list(range(self.parallel.dp_rank, n_prompts, self.parallel.dp_size))
        for i in range(0, len(mine), per_batch):
            batch = mine[i: i + per_batch]
            if not all(j in self.done for j in batch):
                yield batch

    def __enter__(self) -> "ResumableOutput":
        self._rows = self.path.open("a", encoding="utf-8")
        self._marks = self.index.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._rows.close()
        self._marks.close()

    def add(self, source: int, task: str, rows: list[dict], drawn: int, rejected: Counter) -> None:
        """One prompt's kept rows and its mark (rows are flushed before the mark is)."""
        for r in rows:
            self._rows.write(json.dumps({**r, "source": source}, ensure_ascii=False) + "\n")
        self._rows.flush()
        self._marks.write(json.dumps({"source": source, "task": task, "samples": drawn, "kept": len(rows),
                                      "rejected": dict(rejected)}) + "\n")

    def batch_done(self) -> None:
        self._marks.flush()

    def finish(self, title: str) -> dict:
        """After every rank is done: rank 0 writes and prints the stats over all ranks' indexes."""
        self.parallel.barrier()
        stats, size = {}, self.parallel.dp_size
        if self.parallel.is_main:
            if size > 1:  # one SFT-ready file for the next stage, in prompt order
                rows = [r for k in range(size) if (p := shard_path(self.root, k, size)).is_file()
                        for r in read_metrics(p)]
                write_jsonl(sorted(rows, key=lambda r: (r["source"], r.get("sample", 0))), self.root)
            stats = write_stats(self.root, size, title)
        self.parallel.barrier()
        return stats

def write_stats(out: Path, shards: int, title: str) -> dict:
    """Kept and rejected (by reason) per task; for every task kept + rejected adds up to samples."""
    from rich.table import Table

    per_task: dict[str, Counter] = defaultdict(Counter)
    for r in range(shards):
        for m in read_metrics(_index_of(shard_path(out, r, shards))):
            c = per_task[m["task"]]
            c["prompts"] += 1
            c["samples"] += m["samples"]
            c["kept"] += m["kept"]
            for why, n in m["rejected"].items():
                c[why] += n
    stats = {task: dict(c) for task, c in per_task.items()}
    reasons = sorted({k for c in per_task.values() for k in c} - {"prompts", "samples", "kept"})
    table = Table(title=f"{title} ({out})")
    for col in ["task", "prompts", "samples", "kept", *reasons]:
        table.add_column(col)
    for task, c in per_task.items():
        table.add_row(task, *(str(c[k]) for k in ["prompts", "samples", "kept", *reasons]))
    write_text_atomic(out.with_name(out.name + ".stats.json"), json.dumps(stats, indent=1))
    console.print(table)
    return stats

