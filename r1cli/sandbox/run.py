"""Run one untrusted Python program and always get a verdict back, never a crash or a leftover process.

Isolation, strongest first (what this machine allows is probed once, see `isolation()`):

* a fresh temporary directory, the program's only writable place, deleted afterwards;
* a new process session, so the whole group is killed at the end;
* resource limits: CPU seconds, address space, largest file, open files, processes;
* as root: the program runs as an unprivileged uid of its own (one per pool slot), so it cannot
  read the user's home, signal its parent or write outside its directory, its process limit is
  its own, and every process of that uid -- also one that escaped the group with setsid -- is
  killed at the end; new namespaces: network (no interface but a downed loopback: no connection
  anywhere), IPC (SysV shared memory, queues and semaphores die with it), PID (with a /proc of its
  own showing only its processes: no host process or command line is visible) and mounts, where
  one tmpfs of limits.disk_mb holds its whole filesystem view, into which it is chrooted: the
  interpreter's folders read-only, a few device files, a minimal /etc, and its only writable places
  (/tmp with its working folder, /dev/shm) -- the project, run folders, data files, /home and /root
  are not there; nothing it writes outlives it and all its files together stay under that size; its processes
  together stay under limits.memory_mb through a memory cgroup (v2, or v1's memory controller)
  where one is writable. What a machine cannot enforce is said once, on stderr, at the first run.
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
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r1cli.run.signals import signals_deferred

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x40000000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
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
    # everything it writes, in all its writable places together (one size-capped private tmpfs; as root)
    disk_mb: int = 64


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
    with _PROBING:
        return _probe_isolation()


def _probe_isolation() -> dict[str, bool]:
    if os.geteuid() != 0:
        return {"uid": False, "netns": False, "mntns": False, "ipcns": False, "pidns": False}
    python = interpreter()
    r, w = os.pipe()
    with signals_deferred():  # an interrupt inside the after-fork handlers would be printed and lost
        pid = os.fork()
    if pid == 0:  # child: try each, report a bit mask, never return into the caller's code
        mask = 0
        try:
            libc = _LIBC
            mask |= 1 if libc.unshare(CLONE_NEWNET) == 0 else 0
            if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
                mask |= 2
            mask |= 8 if libc.unshare(CLONE_NEWIPC) == 0 else 0
            mask |= 16 if libc.unshare(CLONE_NEWPID) == 0 else 0
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
    mntns = bool(mask & 2)
    return {"uid": bool(mask & 4), "netns": bool(mask & 1), "mntns": mntns, "ipcns": bool(mask & 8),
            "pidns": mntns and bool(mask & 16)}  # a PID namespace needs its own /proc, so a mount namespace


_PROBING = threading.Lock()  # the probes below run once even when the pool's threads ask at the same moment


@lru_cache(maxsize=1)
def memory_cgroup() -> tuple[str, Path] | None:
    """A cgroup folder of this process's where a child group per sandbox uid can be made with a memory limit:
    ("v2", dir) with memory.max, ("v1", dir) with memory.limit_in_bytes, or None."""
    with _PROBING:
        return _probe_memory_cgroup()


def _probe_memory_cgroup() -> tuple[str, Path] | None:
    if os.geteuid() != 0:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in _read(base / "cgroup.subtree_control").split():
                candidate = ("v2", base)
            else:
                continue
        elif "memory" in controllers.split(","):
            candidate = ("v1", Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
        else:
            continue
        probe = candidate[1] / f"r1-sandbox-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            probe.mkdir()
            ok = (probe / ("memory.max" if candidate[0] == "v2" else "memory.limit_in_bytes")).exists()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return candidate
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class _MemoryLimit:
    """The memory of one program's processes together, in a cgroup of its uid (reused run after run)."""

    def __init__(self, uid: int, limit_mb: int):
        kind, base = memory_cgroup()  # type: ignore[misc]
        self.kind, self.dir = kind, base / f"r1-sandbox-{uid}"
        self.dir.mkdir(exist_ok=True)
        limit = str(limit_mb << 20)
        if kind == "v2":
            (self.dir / "memory.max").write_text(limit)
            if (self.dir / "memory.swap.max").exists():
                (self.dir / "memory.swap.max").write_text("0")
            self.ooms = self._v2_ooms()
        else:
            memsw = self.dir / "memory.memsw.limit_in_bytes"  # memory and swap: never below the memory limit
            if memsw.exists():
                memsw.write_text("-1")
            (self.dir / "memory.limit_in_bytes").write_text(limit)
            if memsw.exists():
                memsw.write_text(limit)  # no swapping past it
            for name in ("memory.failcnt", "memory.memsw.failcnt", "memory.max_usage_in_bytes"):
                if (self.dir / name).exists():
                    (self.dir / name).write_text("0")
        self.limit = limit_mb << 20
        self.procs = str(self.dir / "cgroup.procs").encode()

    def _v2_ooms(self) -> int:
        for line in _read(self.dir / "memory.events").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def hit(self) -> bool:
        """Whether the limit was reached during the run (the kernel then killed a process of it)."""
        if self.kind == "v2":
            return self._v2_ooms() > self.ooms
        failed = any(_read(self.dir / f).strip() not in ("", "0") for f in ("memory.failcnt", "memory.memsw.failcnt"))
        return failed or int(_read(self.dir / "memory.max_usage_in_bytes").strip() or 0) >= self.limit


_SAID: dict[str, str] = {}
_SAYING = threading.Lock()


def not_enforced_here() -> str:
    """What this machine cannot enforce, said once (stderr) when the first program runs; "" when all is."""
    with _SAYING:
        if "text" not in _SAID:
            _SAID["text"] = _say_not_enforced()
        return _SAID["text"]


def _say_not_enforced() -> str:
    iso, missing = isolation(), []
    if os.geteuid() != 0:
        missing.append("not root: no uid of its own, no namespaces (network, mounts, IPC, processes), no total "
                       "disk limit, the host's files in view")
    else:
        for key, what in (("netns", "network"), ("mntns", "minimal filesystem view, private writable places and "
                                                           "total disk limit"),
                          ("ipcns", "IPC"), ("pidns", "hidden host processes")):
            if not iso[key]:
                missing.append(f"no {what} namespace" if key != "mntns" else f"no {what}")
        if memory_cgroup() is None:
            missing.append("memory limited per process, not for a program's processes together (no writable "
                           "memory cgroup)")
    if missing:
        print("sandbox: " + "; ".join(missing), file=sys.stderr)
    return "; ".join(missing)


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
        with signals_deferred():
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


def _mirror_exit(child: int, in_init: bool) -> None:
    """Wait for `child`, then end the same way it did (its exit code, or its signal); never returns. Every file
    descriptor is closed first: the program's pipes then end with the program, and subprocess's own pipe, which
    tells the parent that the program started, with the exec. A namespace's first process cannot die by a signal
    of its own: it exits 128 + the signal instead, and the process outside (`in_init` False) turns that back into
    the signal (so a program's own exit code above 128 reads as a signal, as in a shell)."""
    os.closerange(0, os.sysconf("SC_OPEN_MAX"))
    _, status = os.waitpid(child, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    if in_init:
        os._exit(128 + sig if sig else code)
    if not sig and code > 128:
        sig = code - 128
    if sig:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(code)


def _preexec(workdir: str, limits: Limits, uid: int | None, iso: dict[str, bool], cgroup_procs: bytes | None):
    def setup():  # runs in the child between fork and exec
        os.chdir(workdir)  # before /tmp is covered below: the cwd keeps pointing at the real directory
        libc = _LIBC
        if cgroup_procs is not None:  # this process and all it starts count against one memory limit
            fd = os.open(cgroup_procs, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
        flags = (CLONE_NEWNET if iso["netns"] else 0) | (CLONE_NEWIPC if iso["ipcns"] else 0)
        if flags:
            libc.unshare(flags)
        if iso["mntns"] and libc.unshare(CLONE_NEWNS | (CLONE_NEWPID if iso["pidns"] else 0)) == 0:
            libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
            # one size-capped tmpfs holds the program's whole filesystem view (_minimal_root): its root, its
            # working folder and its only writable places (/tmp, /dev/shm), so all it writes stays under
            # limits.disk_mb, and of the host it sees the interpreter's read-only folders and nothing else
            libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV,
                       f"size={limits.disk_mb}m,mode=1777".encode())
            root = _minimal_root(libc, uid)
            if iso["pidns"]:
                # this process stays outside and ends as its child does; the child is the namespace's first
                # process (it sees only the namespace's processes in a /proc of its own) and runs the program as
                # its own child, so the program is not an init that ignores signals
                child = os.fork()
                if child:
                    _mirror_exit(child, in_init=False)
                # hidepid=2: the program sees its own processes only, not this one (a copy of the caller, whose
                # command line it still carries)
                libc.mount(b"proc", f"{root}/proc".encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           b"hidepid=2")
                child = os.fork()
                if child:
                    _mirror_exit(child, in_init=True)
            os.chroot(root)  # (escaping a chroot takes root, which the program no longer is below)
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


# What a program sees of the host: the interpreter's prefix read-only, a few device files, a minimal /etc; the
# project, run folders, data files, /home and /root are absent. Folders that are symlinks (/bin -> usr/bin on a
# merged /usr) are recreated as the same symlinks.
SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
MS_REMOUNT, MS_RDONLY = 0x20, 0x1


def _minimal_root(libc, uid: int | None) -> str:
    """Build the program's root inside the tmpfs at /tmp (between fork and exec, as root in the new mount
    namespace); returns its path, for chroot once /proc is mounted in it."""
    root = "/tmp/.root"
    os.mkdir(root, 0o755)
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(interpreter())))
    folders = list(SYSTEM_FOLDERS) + ([prefix] if not prefix.startswith("/usr") else [])
    for folder in folders:
        if os.path.islink(folder):
            os.symlink(os.readlink(folder), root + folder)
        elif os.path.isdir(folder):
            target = (root + folder).encode()
            os.makedirs(target, exist_ok=True)
            libc.mount(folder.encode(), target, None, MS_BIND | MS_REC, None)
            libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.mkdir(root + "/etc", 0o755)
    name = "sandbox"
    with open(root + "/etc/passwd", "w") as f:
        f.write(f"root:x:0:0::/:/usr/sbin/nologin\n"
                f"{name}:x:{uid or 65534}:{uid or 65534}::/tmp/work:/usr/sbin/nologin\n")
    with open(root + "/etc/group", "w") as f:
        f.write(f"root:x:0:\n{name}:x:{uid or 65534}:\n")
    if os.path.isfile("/etc/ld.so.cache"):  # the dynamic loader finds the interpreter's libraries faster with it
        with open("/etc/ld.so.cache", "rb") as src, open(root + "/etc/ld.so.cache", "wb") as dst:
            dst.write(src.read())
    os.mkdir(root + "/dev", 0o755)
    for dev in DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            open(f"{root}/dev/{dev}", "w").close()
            libc.mount(f"/dev/{dev}".encode(), f"{root}/dev/{dev}".encode(), None, MS_BIND, None)
    for name_, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                          ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name_}")
    for writable in ("/tmp", "/dev/shm"):
        os.mkdir(root + writable, 0o1777)
        os.chmod(root + writable, 0o1777)
    os.mkdir(root + "/proc", 0o555)
    os.mkdir(root + "/tmp/work")
    with open("main.py", "rb") as src, open(root + "/tmp/work/main.py", "wb") as dst:
        dst.write(src.read())
    if uid is not None:
        os.chown(root + "/tmp/work", uid, uid)
        os.chown(root + "/tmp/work/main.py", uid, uid)
    return root


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
    not_enforced_here()
    slot = _SLOTS.take()
    uid = FIRST_UID + slot if iso["uid"] else None
    memory = _MemoryLimit(uid, limits.memory_mb) if uid is not None and memory_cgroup() is not None else None
    workdir = tempfile.mkdtemp(prefix="r1-sandbox-")
    t0 = time.perf_counter()
    proc = None
    try:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(Path(workdir, "main.py"), uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        with signals_deferred():
            proc = subprocess.Popen([interpreter(), "-I", "main.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True, close_fds=True,
                                    preexec_fn=_preexec(workdir, limits, uid, iso,
                                                        memory.procs if memory is not None else None))
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
        if status is None and memory is not None and memory.hit() and code_ != 0:
            status, reason = "memory", f"over {limits.memory_mb} MB of memory (its processes together)"
        elif status is None:
            status, reason = _verdict(code_, stderr, limits)
        else:
            reason = {"output": f"output over {limits.output_kb} KB", "timeout": f"over {limits.wall_s:g} s wall time"}[
                status]
        return Result(status, code_, stdout, stderr, reason, time.perf_counter() - t0)
    finally:
        if proc is not None and proc.returncode is None:  # interrupted (Ctrl-C) while it ran: nothing outlives it
            _kill_all(proc, uid)
            proc.wait()
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


def run_many(jobs: list[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None,
             runner=None) -> list[Result]:
    """(code, stdin) jobs in a bounded pool, results in order; each run by `runner(code, stdin, limits)`
    (run_program, or the launchers' launch)."""
    from concurrent.futures import ThreadPoolExecutor

    run = runner or run_program
    workers = max(1, min(workers or (os.cpu_count() or 1) * 2, MAX_SLOTS))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run(job[0], job[1], limits), jobs))
