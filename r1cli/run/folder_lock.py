"""One writer per output folder: a second r1 process into a folder in use is refused in one line.

The lock is an flock on a file in the folder, held for the life of the process, so the kernel releases it when
its holder ends in any way (exit, crash, SIGKILL): no stale lock to clear by hand. Under torchrun the launch's
rank 0 holds it for all ranks (torchrun stops the others when rank 0 fails).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from r1cli.errors import R1Error

_HELD: dict[str, int] = {}  # lock file -> descriptor, for the life of the process


def launch_rank() -> int:
    """This process's global rank under torchrun or srun (0 alone), known before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def hold(folder: str | Path, what: str, name: str = ".r1.lock") -> None:
    """Take `folder`'s lock (creating the folder) or refuse; taking it again in the same process is a no-op."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = str(path.resolve())
    if key in _HELD:
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise R1Error(f"{what} {folder} is in use by another r1 process ({holder}); wait for it to end or write "
                      "somewhere else") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[key] = fd


def hold_on_rank0(folder: str | Path, what: str, name: str = ".r1.lock") -> None:
    if launch_rank() == 0:
        hold(folder, what, name)
