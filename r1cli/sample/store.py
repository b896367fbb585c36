"""Append-only output of a generate-and-filter command (r1 sample, r1 coldstart) that a restart continues exactly.

Beside the rows (`out`, JSONL) live `<out>.done`, one line per finished prompt (how many samples were drawn,
kept, and rejected by reason, and its batch), and `<out>.stats.json`. Prompts go in fixed batches; a batch's
rows are appended in one write before its marks are, in one write too; on restart a torn last line is cut
off, a batch without all its marks is dropped with its rows and done again, so a run stopped at any point
(SIGINT, SIGKILL, a full disk) and started again writes exactly what an uninterrupted run writes.
Under torchrun each data-parallel rank takes every dp_size-th prompt into files of its own.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from r1cli.data.records import write_jsonl
from r1cli.run import folder_lock
from r1cli.run.append_log import AppendLog, cut_torn_tail
from r1cli.run.checkpoint import write_text_atomic
from r1cli.run.console import console
from r1cli.run.identity import check as identity_check
from r1cli.run.metrics import read_metrics


def shard_path(path: Path, rank: int, size: int) -> Path:
    return path if size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def identity_record(out: str | Path) -> Path:
    """Where the identity of `out`'s rows is recorded (r1cli.run.identity)."""
    out = Path(out)
    return out.with_name(out.name + ".identity.json")


def _index_of(path: Path) -> Path:
    return path.with_name(path.name + ".done")


class ResumableOutput:
    """This rank's rows and finished-prompt index; `pending` gives the batches still to do."""

    def __init__(self, out: str | Path, parallel, overwrite: bool = False, identity: dict | None = None,
                 what: str = "sample.out"):
        """`identity` (r1cli.run.identity) defines the rows: a restart with other inputs is refused. One process
        writes into `out` at a time (its lock: `<out>.lock`)."""
        self.root, self.parallel = Path(out), parallel
        self.path = shard_path(self.root, parallel.dp_rank, parallel.dp_size)
        self.index = _index_of(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = identity_record(self.root)
        if parallel.is_main:
            folder_lock.hold(self.root.parent, what, name=self.root.name + ".lock")
            if overwrite:
                record.unlink(missing_ok=True)
            if identity is not None:
                identity_check(record, identity, f"{what} {self.root}",
                               f"--overwrite starts it again, or write to another {what} (or delete {record} to "
                               "continue with the new inputs)")
        parallel.barrier()
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.index.unlink(missing_ok=True)
        for f in (self.path, self.index):
            cut_torn_tail(f, console.print)
        # a batch counts as done only with the marks of all its prompts (a kill inside the marks' write may
        # leave some); the marks and rows of any other batch are dropped and the batch is done again
        marks = read_metrics(self.index) if self.index.is_file() else []
        per_batch = Counter(m.get("batch", m["source"]) for m in marks)
        whole = [m for m in marks if per_batch[m.get("batch", m["source"])] == m.get("of", 1)]
        if len(whole) < len(marks):
            write_jsonl(whole, self.index)
        self.done = {m["source"] for m in whole}
        if self.path.is_file():  # rows of a batch whose prompts were never marked: that batch is redone
            rows = read_metrics(self.path)
            keep = [r for r in rows if r["source"] in self.done]
            if len(keep) < len(rows):
                write_jsonl(keep, self.path)
        self._rows_buf: list[dict] = []
        self._marks_buf: list[dict] = []

    def pending(self, n_prompts: int, per_batch: int) -> Iterator[list[int]]:
        """This rank's prompts in fixed batches (the same on every run), skipping finished batches."""
        mine = list(range(self.parallel.dp_rank, n_prompts, self.parallel.dp_size))
        for i in range(0, len(mine), per_batch):
            batch = mine[i: i + per_batch]
            if not all(j in self.done for j in batch):
                self._batch = batch
                yield batch

    def __enter__(self) -> "ResumableOutput":
        self._rows = AppendLog(self.path)
        self._marks = AppendLog(self.index)
        return self

    def __exit__(self, *exc) -> None:
        self._rows.close()
        self._marks.close()

    def add(self, source: int, task: str, rows: list[dict], drawn: int, rejected: Counter) -> None:
        """One prompt's kept rows and its mark, held until the batch is done."""
        self._rows_buf += [{**r, "source": source} for r in rows]
        self._marks_buf.append({"source": source, "task": task, "samples": drawn, "kept": len(rows),
                                "rejected": dict(rejected), "batch": self._batch[0], "of": len(self._batch)})

    def batch_done(self) -> None:
        """The batch's rows, then its marks, each in one write: an interrupt before the marks are whole leaves
        a batch that the next run drops and redoes."""
        self._rows.append(self._rows_buf)
        self._marks.append(self._marks_buf)
        self.done.update(m["source"] for m in self._marks_buf)
        self._rows_buf, self._marks_buf = [], []

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

