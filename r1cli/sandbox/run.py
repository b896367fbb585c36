"""Run one untrusted Python program and always get a verdict back, never a crash or a leftover process.

Isolation, strongest first (what this machine allows is probed once, see `isolation()`):

* a fresh temporary directory, the program's only writable place, deleted afterwards;
* a new process session, so the whole group is killed at the end;
* resource limits: CPU seconds, address space, largest file, open files, processes;
* as root: the program runs as an unprivileged uid of its own (one per pool slot), so it cannot
  read the user's home, signal its parent or write outside its directory, its process limit is
  its own, and every process of that uid -- also one that escaped the group with setsid -- is
  killed at the end; a new network namespace (no interface but a downed loopback: no
  connection anywhere) and a new mount namespace whose /tmp, /var/tmp and /dev/shm are empty
  private tmpfs, so nothing it writes there outlives it.
* not root (the documented weaker fallback): resource limits, the session and the directory
  only; a program that calls setsid can outlive its group, and network access is not blocked.
* root without a usable unprivileged uid: nothing runs (a "setup" verdict): the process limit
  does not bind root, so a fork bomb would take the machine.

The wall-clock limit and the output cap are enforced from outside: past either the program is
killed and the verdict says why.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
FIRST_UID = 61000  # slot i runs as uid FIRST_UID + i
UIDS = 256  # slots machine-wide
MAX_SLOTS = 64  # programs at once in one process
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: between fork and exec only plain calls are safe


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    processes: int = 32  # processes of its uid (as root), or of the user (fallback)
    output_kb: int = 1024  # stdout and stderr kept, each; more is an output-limit verdict


@dataclass
class Result:
    status: str  # ok | error (non-zero exit) | timeout | memory | output | signal | setup (refused to run)
    exit_code: int | None
    stdout: str
    stderr: str
    reason: str  # one line for a human
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@lru_cache(maxsize=1)
def isolation() -> dict[str, bool]:
    """Which protections this machine allows: probed once in a throwaway child process."""
    if os.geteuid() != 0:
        return {"uid": False, "netns": False, "mntns": False}
    python = interpreter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: try each, report a bit mask, never return into the caller's code
        mask = 0
        try:
            libc = _LIBC
            mask |= 1 if libc.unshare(CLONE_NEWNET) == 0 else 0
            if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
                mask |= 2
            os.setgroups([])
            os.setgid(FIRST_UID)
            os.setuid(FIRST_UID)
            mask |= 4 if os.access(python, os.X_OK) else 0
        except OSError:
            pass
        os.write(w, bytes([mask]))
        os._exit(0)
    os.close(w)
    mask = (os.read(r, 1) or b"\0")[0]
    os.close(r)
    os.waitpid(pid, 0)
    return {"uid": bool(mask & 4), "netns": bool(mask & 1), "mntns": bool(mask & 2)}


def interpreter() -> str:
    """A Python any uid can execute (the system's); the one running r1 may live under a private home."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return candidate
    return shutil.which("python3") or "python3"


class _Slots:
    """Pool slots, each a uid of its own, one program per uid at a time -- across every process on the machine
    (two r1 processes must never share a uid: each one's final sweep would kill the other's programs). A slot
    is held by an flock on a file named after its uid, released by the kernel if its holder dies."""

    def __init__(self, n: int):
        self.local = threading.BoundedSemaphore(n)  # bounds this process's concurrent runs
        self.held: dict[int, int] = {}
        self.turn = 0
        self.lock = threading.Lock()
        self.dir = Path(tempfile.gettempdir()) / "r1-sandbox-slots"

    def take(self) -> int:
        self.local.acquire()
        self.dir.mkdir(mode=0o700, exist_ok=True)
        with self.lock:  # rotate: a uid just swept may still have zombies counting against its process limit
            self.turn += 1
            start = (os.getpid() * 31 + self.turn) % UIDS
        while True:
            for k in range(UIDS):
                slot = (start + k) % UIDS
                fd = os.open(self.dir / f"{FIRST_UID + slot}.lock", os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                with self.lock:
                    self.held[slot] = fd
                return slot
            time.sleep(0.05)  # every uid busy machine-wide

    def give(self, slot: int) -> None:
        with self.lock:
            fd = self.held.pop(slot)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self.local.release()


_SLOTS = _Slots(MAX_SLOTS)


def _uid_alive(uid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
            # a zombie is already dead (its parent, or init, has yet to reap it): it holds nothing
            if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
                return True
    return False


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """The program's group, then (own uid) every process of that uid -- also any that left the group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(50):
        # kill(-1) from a process of that uid reaches all of the uid's processes in one sweep of the
        # process table, so a fork bomb cannot outrun it as it could a kill per pid
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        if not _uid_alive(uid):
            return
        time.sleep(0.01)


def _preexec(workdir: str, limits: Limits, uid: int | None, iso: dict[str, bool]):
    def setup():  # runs in the child between fork and exec
        os.chdir(workdir)  # before /tmp is covered below: the cwd keeps pointing at the real directory
        libc = _LIBC
        if iso["netns"]:
            libc.unshare(CLONE_NEWNET)
        if iso["mntns"] and libc.unshare(CLONE_NEWNS) == 0:
            libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
            for shared in (b"/tmp", b"/var/tmp", b"/dev/shm"):
                if os.path.isdir(shared):
                    libc.mount(b"tmpfs", shared, b"tmpfs", 0, b"size=16m,mode=1777")
            # the working directory (under the now covered /tmp) stays reachable as /tmp/work
            os.mkdir("/tmp/work")
            libc.mount(b".", b"/tmp/work", None, MS_BIND, None)
            os.chdir("/tmp/work")
        mb = 1 << 20
        # CPU: SIGXCPU at the soft limit (a clear verdict), SIGKILL a second later at the hard one
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        for which, value in ((resource.RLIMIT_AS, limits.memory_mb * mb), (resource.RLIMIT_FSIZE, limits.file_mb * mb),
                             (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_NPROC, limits.processes),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return setup


def _reader(stream, cap: int, box: list, over: threading.Event) -> None:
    """Keep the first `cap` bytes; past them raise the flag (the caller kills) but keep draining."""
    kept, total = bytearray(), 0
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        total += len(chunk)
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
        if total > cap:
            over.set()
    box.append(bytes(kept))


def run_program(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run `code` with `python3 -I` on `stdin` inside the sandbox; the verdict is always a Result."""
    iso = isolation()
    if os.geteuid() == 0 and not iso["uid"]:
        # as root the process limit does not apply: a fork bomb would take the machine
        return Result("setup", None, "", "", "refusing to run untrusted code as root: no unprivileged uid can "
                      f"execute {interpreter()} (install the system python3)", 0.0)
    slot = _SLOTS.take()
    uid = FIRST_UID + slot if iso["uid"] else None
    workdir = tempfile.mkdtemp(prefix="r1-sandbox-")
    t0 = time.perf_counter()
    try:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(Path(workdir, "main.py"), uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([interpreter(), "-I", "main.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True, close_fds=True,
                                preexec_fn=_preexec(workdir, limits, uid, iso))
        over = threading.Event()
        out, err = [], []
        cap = limits.output_kb * 1024
        readers = [threading.Thread(target=_reader, args=(proc.stdout, cap, out, over), daemon=True),
                   threading.Thread(target=_reader, args=(proc.stderr, cap, err, over), daemon=True)]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        status = None
        deadline = t0 + limits.wall_s
        while proc.poll() is None:
            if over.is_set():
                status = "output"
                break
            if time.perf_counter() > deadline:
                status = "timeout"
                break
            time.sleep(0.005)
        _kill_all(proc, uid)  # also whatever it left behind when it exited by itself
        proc.wait()
        for t in readers:
            t.join(timeout=5)
        stdout = (out[0] if out else b"").decode("utf-8", "replace")
        stderr = (err[0] if err else b"").decode("utf-8", "replace")
        code_ = proc.returncode
        if status is None and over.is_set():
            status = "output"
        if status is None:
            status, reason = _verdict(code_, stderr, limits)
        else:
            reason = {"output": f"output over {limits.output_kb} KB", "timeout": f"over {limits.wall_s:g} s wall time"}[
                status]
        return Result(status, code_, stdout, stderr, reason, time.perf_counter() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _SLOTS.give(slot)


def _verdict(code: int, stderr: str, limits: Limits) -> tuple[str, str]:
    if code == 0:
        return "ok", "exited 0"
    if code == -signal.SIGXCPU:
        return "timeout", f"over {limits.cpu_s} s CPU time"
    if "MemoryError" in stderr:
        return "memory", f"over {limits.memory_mb} MB of memory"
    if code < 0:
        return "signal", f"killed by {signal.Signals(-code).name}"
    last = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
    return "error", f"exit {code}: {last[:200]}"


def run_many(jobs: list[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """(code, stdin) jobs in a bounded pool, results in order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(workers or (os.cpu_count() or 1) * 2, MAX_SLOTS))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))
