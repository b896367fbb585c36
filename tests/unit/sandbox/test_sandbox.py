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
    assert r.status == "error" and "PermissionError" in r.reason
    r = run_program(f"open({str(marker)!r}, 'w').write('x')\nopen('own.txt', 'w').write('fine')", "", FAST)
    assert r.ok and not marker.exists()  # /tmp inside is a private tmpfs that died with it


@needs_isolation
def test_reading_the_users_home():
    r = run_program("print(open(__import__('os').path.expanduser('~root') + '/.bashrc').read())", "", FAST)
    assert r.status == "error" and "PermissionError" in r.reason and r.stdout == ""


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
