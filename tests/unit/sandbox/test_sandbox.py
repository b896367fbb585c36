"""Hostile programs each end as a failed sample with a reason, the caller goes on, and nothing is left."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from r1cli.sandbox import Limits, isolation, run_many, run_program
from r1cli.sandbox.run import FIRST_UID, UIDS

FAST = Limits(wall_s=5.0, cpu_s=3, memory_mb=256, output_kb=64, processes=16)
ISOLATED = isolation()["uid"] and isolation()["netns"] and isolation()["mntns"]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="runs as root with namespaces only (the weaker "
                                                          "fallback of a non-root user cannot pass these)")


def sandbox_processes() -> list[int]:
    """Live processes of the sandbox uids (zombies are dead already: killed, waiting for init to reap them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = dict(ln.split(":", 1) for ln in (entry / "status").read_text().splitlines() if ":" in ln)
                uid = int(fields["Uid"].split()[0])
            except (OSError, KeyError, ValueError):
                continue
            if FIRST_UID <= uid < FIRST_UID + UIDS and not fields["State"].strip().startswith("Z"):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its run"


def test_a_good_program_reads_stdin_and_writes_stdout():
    r = run_program("a, b = map(int, input().split())\nprint(a + b)", "2 40\n", FAST)
    assert r.ok and r.stdout == "42\n" and r.exit_code == 0


def test_an_exception_is_an_error_with_its_last_line():
    r = run_program("raise ValueError('bad input')", "", FAST)
    assert r.status == "error" and "ValueError: bad input" in r.reason


def test_infinite_loop():
    r = run_program("while True:\n    pass", "", FAST)
    assert r.status == "timeout" and "CPU" in r.reason and r.wall_s < FAST.wall_s + 2


def test_sleeping_forever_hits_the_wall_clock():
    r = run_program("import time\ntime.sleep(1000)", "", Limits(wall_s=1.0))
    assert r.status == "timeout" and "wall" in r.reason and r.wall_s < 3


def test_fork_bomb():
    r = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "", FAST)
    assert not r.ok and r.status in ("timeout", "signal")


def test_memory_hog():
    r = run_program("x = bytearray(4 << 30)", "", FAST)
    assert r.status == "memory" and "256 MB" in r.reason


def test_gigabytes_of_output():
    t0 = time.perf_counter()
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "", FAST)
    assert r.status == "output" and len(r.stdout) == FAST.output_kb * 1024 and time.perf_counter() - t0 < 5


@needs_isolation
def test_writing_outside_its_directory():
    marker = Path("/tmp") / f"r1-escape-{os.getpid()}"
    r = run_program("open('/work/escape.txt', 'w')", "", FAST)
    assert r.status == "error" and ("PermissionError" in r.reason or "FileNotFoundError" in r.reason)  # (not there)
    r = run_program(f"open({str(marker)!r}, 'w').write('x')\nopen('own.txt', 'w').write('fine')", "", FAST)
    assert r.ok and not marker.exists()  # /tmp inside is a private tmpfs that died with it


@needs_isolation
def test_reading_the_users_home():
    r = run_program("print(open(__import__('os').path.expanduser('~root') + '/.bashrc').read())", "", FAST)
    assert r.status == "error" and r.stdout == ""
    assert "PermissionError" in r.reason or "FileNotFoundError" in r.reason  # (with a mount namespace: not there)


@needs_isolation
def test_opening_a_network_connection():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "", FAST)
    finally:
        server.close()
    assert r.status == "error" and "OSError" in r.reason or "Errno" in r.reason, r.reason
    assert accepted == []


@needs_isolation
def test_killing_its_parent():
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "", FAST)
    assert r.status == "error" and "PermissionError" in r.reason  # and this test process is still here


@needs_isolation
def test_setsid_does_not_escape():
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    time.sleep(1000)\n"
            "print('parent done')")
    r = run_program(code, "", FAST)
    assert r.ok and r.stdout == "parent done\n"  # the grandchild is killed by uid (checked by the fixture)


def test_many_in_a_bounded_pool_keep_their_order():
    jobs = [(f"print({i} * {i})", "") for i in range(20)] + [("while True: pass", "")]
    results = run_many(jobs, Limits(cpu_s=1, wall_s=3), workers=4)
    assert [r.stdout for r in results[:20]] == [f"{i * i}\n" for i in range(20)]
    assert results[20].status == "timeout"


def test_root_without_an_unprivileged_uid_refuses_to_run(monkeypatch):
    import r1cli.sandbox.run as sb

    monkeypatch.setattr(sb, "isolation", lambda: {"uid": False, "netns": False, "mntns": False})
    monkeypatch.setattr(sb.os, "geteuid", lambda: 0)
    r = run_program("print('never')", "", FAST)
    assert r.status == "setup" and "refusing to run untrusted code as root" in r.reason and r.stdout == ""


# ------------------------------------------------------------------ a program as a whole, and what it may see

from r1cli.sandbox.run import memory_cgroup  # noqa: E402


def writable_places() -> list[str]:
    """The host's world-writable folders (/tmp, /var/tmp, /dev/shm, /run/lock, ...): top-level ones and their
    children."""
    found = []
    for top in (Path("/"), Path("/var"), Path("/run"), Path("/dev")):
        for d in (top.iterdir() if top.is_dir() else []):
            try:
                if not d.is_symlink() and d.is_dir() and str(d) not in ("/proc", "/sys") and d.stat().st_mode & 0o002:
                    found.append(str(d))
            except OSError:
                continue
    return found

FULL = ISOLATED and isolation()["ipcns"] and isolation()["pidns"]
needs_namespaces = pytest.mark.skipif(not FULL, reason="runs as root with IPC and PID namespaces only")


@needs_namespaces
def test_nothing_it_writes_anywhere_survives_it():
    """/run/lock (also reached as /var/lock) and every other world-writable folder of the host are absent from the
    program's view or private to it: what it manages to write there is gone with it."""
    places = sorted(set(writable_places()) | {"/run/lock", "/var/lock", "/var/tmp", "/dev/shm", "/tmp"})
    name = f"r1-left-{os.getpid()}"
    code = ("import os\nwrote = []\nfor d in %r:\n    try:\n        os.makedirs(d, exist_ok=True)\n"
            "        open(os.path.join(d, %r), 'w').write('x')\n        wrote.append(d)\n"
            "    except OSError:\n        pass\nprint(' '.join(wrote))" % (places, name))
    r = run_program(code, "", FAST)
    assert r.ok, r.reason
    assert set(r.stdout.split()) >= {"/tmp", "/dev/shm"}  # its own writable places
    assert [p for p in places if os.path.exists(os.path.join(p, name))] == []


@needs_namespaces
def test_system_v_ipc_objects_die_with_it():
    key = 0x5100 + os.getpid() % 0xff
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.shmget({key}, 4096, 0o1666) >= 0\nassert libc.msgget({key}, 0o1666) >= 0\n"
            f"assert libc.semget({key}, 1, 0o1666) >= 0\nprint('made')")
    r = run_program(code, "", FAST)
    assert r.ok and r.stdout == "made\n", r.reason
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.shmget(key, 0, 0) == -1 and libc.msgget(key, 0) == -1 and libc.semget(key, 0, 0) == -1


@needs_namespaces
def test_host_processes_and_their_command_lines_are_invisible():
    code = ("import os\ncmds = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n        try:\n"
            "            cmds.append(open(f'/proc/{p}/cmdline', 'rb').read())\n"
            "        except OSError:\n            pass\n"
            "print(len(cmds), any(b'pytest' in c for c in cmds))")
    r = run_program(code, "", FAST)
    assert r.ok, r.reason
    count, seen = r.stdout.split()
    assert seen == "False" and int(count) == 1  # itself only (not even the namespace's first process)


@pytest.mark.skipif(not ISOLATED or memory_cgroup() is None, reason="needs root and a writable memory cgroup")
def test_memory_is_limited_for_all_its_processes_together():
    """Three children of 400 MB each pass no per-process limit of 1 GB, but together they pass the program's."""
    code = ("import os, sys, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
            "        block = b'\\1' * (400 << 20)\n        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
            "sys.exit(any(os.waitpid(k, 0)[1] for k in kids))")
    r = run_program(code, "", Limits(wall_s=20, cpu_s=10, memory_mb=1024))
    assert r.status == "memory" and "together" in r.reason, (r.status, r.reason)
    one = run_program(code.replace("range(3)", "range(1)"), "", Limits(wall_s=20, cpu_s=10, memory_mb=1024))
    assert one.ok, one.reason


@needs_isolation
def test_disk_is_limited_for_all_its_files_together():
    """20 files of 15 MB each pass no per-file limit (16 MB); together they stop at the program's 64 MB."""
    code = ("import os\ntotal = 0\ntry:\n    for i in range(20):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (15 << 20))\n        total += 15\n"
            "except OSError as e:\n    print('stopped', e.errno)\n"
            "print(total)")
    r = run_program(code, "", Limits(wall_s=20, cpu_s=10, memory_mb=512, file_mb=16, disk_mb=64))
    assert r.ok and "stopped 28" in r.stdout and int(r.stdout.split()[-1]) <= 64, (r.reason, r.stdout)


def test_what_a_machine_cannot_enforce_is_said_once(monkeypatch, capsys):
    import r1cli.sandbox.run as sb

    said_before = dict(sb._SAID)
    sb._SAID.clear()
    monkeypatch.setattr(sb, "isolation", lambda: {"uid": True, "netns": True, "mntns": True, "ipcns": False,
                                                  "pidns": False})
    monkeypatch.setattr(sb, "memory_cgroup", lambda: None)
    monkeypatch.setattr(sb.os, "geteuid", lambda: 0)
    said = sb.not_enforced_here()
    assert "no IPC namespace" in said and "no hidden host processes namespace" in said
    assert "memory limited per process" in said and capsys.readouterr().err.startswith("sandbox: ")
    sb.not_enforced_here()
    assert capsys.readouterr().err == ""  # once
    sb._SAID.clear()
    sb._SAID.update(said_before)


CTRL_C_DRIVER = """
import sys
from r1cli.rewards import RewardContext, score
from r1cli.sandbox import Limits, run_program
row = {"task": "code", "tests": [{"input": "2", "output": "4"}]}
print("started", flush=True)
for _ in range(400):
    if sys.argv[1] == "direct":
        run_program("print(int(input()) * 2)", "2", Limits(wall_s=5))
    else:  # rewards in worker threads, the main thread waiting on them
        score(["```python\\nprint(int(input()) * 2)\\n```"] * 2, [row] * 2, {"accuracy": 1.0}, RewardContext(), 30)
print("finished", flush=True)
"""


@pytest.mark.parametrize("how, after_s", [("direct", 0.3), ("direct", 0.55), ("direct", 0.8), ("scored", 0.3),
                                          ("scored", 0.55), ("scored", 0.8)])
def test_ctrl_c_always_stops_sandbox_scoring(how, after_s, tmp_path):
    """SIGINT at any moment of a run of programs -- also inside a fork's after-fork handlers, where Python prints
    an interrupt as 'Exception ignored' and goes on -- stops the run, and leaves no program behind."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DRIVER, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "finished" not in out and proc.returncode != 0, err[-2000:]
    assert "KeyboardInterrupt" in err and "Exception ignored" not in err, err[-2000:]
    deadline = time.time() + 10  # a program the run was waiting for ends with it (its stdin closed)
    while sandbox_processes() and time.time() < deadline:
        time.sleep(0.05)


def test_the_first_programs_of_a_pool_agree_on_what_the_machine_allows():
    """The pool's threads ask at the same moment; each must get the one answer (two probes of the same cgroup
    folder once made one of them see no cgroup at all)."""
    from concurrent.futures import ThreadPoolExecutor

    import r1cli.sandbox.run as sb

    before = sb.memory_cgroup()
    sb.memory_cgroup.cache_clear()
    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: sb.memory_cgroup(), range(8)))
    assert seen == [before] * 8


@needs_namespaces
def test_a_program_sees_nothing_of_the_host_but_the_interpreter(tmp_path):
    """The run's data file (with its answers), the checkout, a file planted in a home folder, the host's users:
    none of them is in the program's view; the interpreter and its standard library are."""
    from conftest import ROOT

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "2+2", "answer": "4"}\n')
    data.chmod(0o644)
    home = Path(f"/home/r1-sandbox-test-{os.getpid()}")
    home.mkdir(parents=True, exist_ok=True)
    planted = home / "planted.txt"
    planted.write_text("secret")
    home.chmod(0o755)
    planted.chmod(0o644)
    try:
        paths = [str(data), str(ROOT / "README.md"), str(ROOT / "r1cli" / "__init__.py"), str(planted), "/root",
                 "/home", "/work", "/var", "/opt"]
        code = ("import os, json, sys\nseen = [p for p in %r if os.path.exists(p)]\n"
                "users = open('/etc/passwd').read().count(chr(10))\n"
                "print(json.dumps([seen, users, sys.version_info[:2], sorted(os.listdir('/'))]))" % (paths,))
        r = run_program(code, "", FAST)
        assert r.ok, (r.reason, r.stderr)
        import json

        seen, users, version, top = json.loads(r.stdout)
        assert seen == [] and users == 2, (seen, users)
        assert set(top) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "tmp", "proc"}, top
        assert tuple(version) >= (3, 8)
    finally:
        planted.unlink()
        home.rmdir()
