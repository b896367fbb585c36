"""Atomic checkpoint directories: write into `step_N.tmp`, then rename; `latest` names the newest.

A crash mid-write leaves a `.tmp` folder that is never read, so the last complete
checkpoint always survives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from r1cli.config import CheckpointConfig
from r1cli.errors import R1Error


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    d = checkpoint_root(run_dir) / f"step_{step:08d}.tmp"
    return d


def begin(run_dir: str | Path, step: int) -> Path:
    d = staging_dir(run_dir, step)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(run_dir: str | Path, step: int, keep: int) -> Path:
    """Publish a staged checkpoint and drop all but the newest `keep`."""
    root = checkpoint_root(run_dir)
    tmp, final = staging_dir(run_dir, step), root / f"step_{step:08d}"
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    _fsync_dir(root)
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))
    for old in done[: max(0, len(done) - keep)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    d = root / pointer.read_text().strip()
    return d if d.is_dir() else None


def require_latest(run_dir: str | Path) -> Path:
    d = latest(run_dir)
    if d is None:
        raise R1Error(f"--resume: no checkpoint under {checkpoint_root(run_dir)}")
    return d


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(trainer, run_dir: str | Path, step: int, keep: int) -> None:
    """Every rank writes its part into the staging folder; rank 0 publishes it."""
    p = trainer.parallel
    staging = begin(run_dir, step) if p.is_main else staging_dir(run_dir, step)
    p.barrier()
    trainer.save(staging, {"step": step})
    if p.is_main:
        commit(run_dir, step, keep)
    p.barrier()


def save_if_due(trainer, run_dir: str | Path, c: CheckpointConfig, done: int, total: int) -> bool:
    """The periodic checkpoint after step `done`; True when `checkpoint.stop_after` says stop here."""
    stop = bool(c.stop_after) and done == c.stop_after
    if stop or (c.every and done % c.every == 0 and done < total):
        save(trainer, run_dir, done, c.keep)
    return stop
