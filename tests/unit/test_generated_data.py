"""Generated data (r1 sample / coldstart rows, eval samples) is exact after any interrupt: a run stopped anywhere --
SIGINT or SIGKILL inside or between batches, a kill in the middle of a write, a full disk -- and started again
leaves the very bytes of an uninterrupted run."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_driver

from r1cli.errors import R1Error
from r1cli.run import append_log

PROMPTS, PER_BATCH = 24, 6
FILES = ("s.jsonl", "s.jsonl.done", "s.jsonl.stats.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("ref")
    store_driver.run(str(d / "s.jsonl"), PROMPTS, PER_BATCH, 0)
    return {f: (d / f).read_bytes() for f in FILES}


def contents(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in FILES}


class Killed(BaseException):
    """The process dying in the middle of a write (nothing after it runs, no cleanup)."""


def cut_writes(monkeypatch, at_write: int, keep: int | None, error: OSError | None = None):
    """The `at_write`-th write call of the store writes its first `keep` bytes, then the process dies (or, with
    `error`, the write fails with it)."""
    real, calls = os.write, [0]

    def write(fd, data):
        calls[0] += 1
        if calls[0] == at_write:
            if error is not None:
                raise error
            real(fd, bytes(data)[:keep])
            raise Killed
        return real(fd, data)

    monkeypatch.setattr(append_log.os, "write", write)


# the writes alternate: a batch's rows (even calls from 0), then its marks; cut inside rows and inside marks at
# several byte offsets, in the first, a middle and the last batch
@pytest.mark.parametrize("at_write, keep", [(1, 10), (2, 0), (2, 150), (2, 400), (5, 5000), (6, 333), (7, 1),
                                            (8, 999999), (8, 700), (2 * PROMPTS // PER_BATCH, 450)])
def test_a_kill_mid_write_then_a_restart_gives_the_uninterrupted_bytes(reference, tmp_path, monkeypatch, at_write,
                                                                       keep):
    out = str(tmp_path / "s.jsonl")
    cut_writes(monkeypatch, at_write, keep)
    with pytest.raises(Killed):
        store_driver.run(out, PROMPTS, PER_BATCH, 0)
    monkeypatch.undo()
    store_driver.run(out, PROMPTS, PER_BATCH, 0)
    assert contents(tmp_path) == reference


def test_a_full_disk_is_one_error_that_leaves_nothing_half_written(reference, tmp_path, monkeypatch):
    out = tmp_path / "s.jsonl"
    cut_writes(monkeypatch, 4, None, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(R1Error, match="disk is full.*continues where it stopped"):
        store_driver.run(str(out), PROMPTS, PER_BATCH, 0)
    # the batch whose marks failed is gone entirely: its rows were cut back too
    assert out.read_bytes() == reference["s.jsonl"][: len(out.read_bytes())]
    marks = out.with_name("s.jsonl.done").read_text().splitlines()
    assert len(marks) == PER_BATCH and {m.count('"batch": 0') for m in marks} == {1}
    monkeypatch.undo()
    store_driver.run(str(out), PROMPTS, PER_BATCH, 0)
    assert contents(tmp_path) == reference


@pytest.mark.parametrize("sig, after_s", [(signal.SIGINT, 0.45), (signal.SIGINT, 1.2), (signal.SIGKILL, 0.5),
                                          (signal.SIGKILL, 1.3), (signal.SIGINT, 0.07 * PER_BATCH * 2 + 0.3)])
def test_a_signal_at_any_time_then_a_restart_gives_the_uninterrupted_bytes(reference, tmp_path, sig, after_s):
    """A real process with a slow reward (0.07 s per prompt), stopped by SIGINT or SIGKILL inside a batch or near
    a batch's end."""
    cmd = [sys.executable, str(Path(store_driver.__file__)), str(tmp_path / "s.jsonl"), str(PROMPTS),
           str(PER_BATCH)]
    proc = subprocess.Popen([*cmd, "0.07"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(after_s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before the signal"
    if sig == signal.SIGINT:
        assert b"KeyboardInterrupt" in err
    subprocess.run([*cmd, "0"], check=True, capture_output=True, timeout=60)
    assert contents(tmp_path) == reference


def test_a_torn_last_line_is_cut_and_said(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    said = []
    append_log.cut_torn_tail(f, said.append)
    assert f.read_bytes() == b'{"a": 1}\n{"a": 2}\n' and "torn last line of 4 bytes" in said[0]
    append_log.cut_torn_tail(f, said.append)
    assert len(said) == 1  # a whole file is left alone
