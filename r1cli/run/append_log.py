"""A JSONL file that grows by whole groups of records: a group is on disk entirely or not at all.

Used for generated data that a restart continues (r1 sample / coldstart rows and marks, r1 eval samples). One
`append` is one write call under deferred SIGINT / SIGTERM (the signal acts right after it); a write that fails
(a full disk, a read-only folder) is cut back to where the group began and becomes one error line; a torn
last line left by SIGKILL or power loss is cut off when the file is opened again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from r1cli.errors import R1Error
from r1cli.run.signals import signals_deferred


def cut_torn_tail(path: Path, say=None) -> None:
    """Drop a last line without its newline (a write cut off by a kill): the file ends on a whole record."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        keep = size
        while keep > 0:  # back to the last newline, in blocks
            start = max(0, keep - 65536)
            f.seek(start)
            block = f.read(keep - start)
            at = block.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            keep = start
        f.truncate(keep)
    if say is not None:
        say(f"{path}: dropped a torn last line of {size - keep} bytes (an earlier run was stopped mid-write)")


def write_failed(path: Path, err: OSError) -> R1Error:
    why = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only",
           13: "permission denied"}.get(err.errno or 0, err.strerror or str(err))
    return R1Error(f"cannot write {path}: {why}; nothing of the unfinished batch was kept, so the same command "
                   "continues where it stopped once that is fixed")


class AppendLog:
    def __init__(self, path: str | Path, say=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path, say)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_failed(self.path, e) from None

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        with signals_deferred():
            start = os.fstat(self.fd).st_size
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError as e:
                os.ftruncate(self.fd, start)
                raise write_failed(self.path, e) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
