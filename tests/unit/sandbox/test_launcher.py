"""Programs started from the launcher processes: the same verdicts as run_program, never a fork of the caller,
and a launcher that dies costs one program."""

import os

from r1cli.sandbox import Limits, launcher, run_program
from r1cli.sandbox.launcher import launch, launch_many

FAST = Limits(wall_s=3.0, cpu_s=2, memory_mb=256, output_kb=64, processes=16)


def test_verdicts_are_run_programs():
    jobs = [("print(int(input()) * 3)", "14"), ("raise ValueError('boom')", ""), ("while True: pass", ""),
            ("print('x' * 10_000_000)", "")]
    got = launch_many(jobs, FAST, workers=4)
    want = [run_program(code, stdin, FAST) for code, stdin in jobs]
    assert [(r.status, r.stdout, r.reason) for r in got] == [(r.status, r.stdout, r.reason) for r in want]
    assert got[0].stdout == "42\n" and [r.status for r in got[1:]] == ["error", "timeout", "output"]


def test_programs_are_not_forked_from_the_caller():
    launch("print(1)", "", FAST)
    launchers = list(launcher._POOL._processes.values())
    assert launchers and all(p.pid != os.getpid() for p in launchers)
    # each launcher is a child of the forkserver, a fresh interpreter: not of this (possibly large) process
    assert all(int(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[1]) != os.getpid()
               for p in launchers)


def test_a_dead_launcher_costs_one_program_and_the_next_starts_fresh():
    assert launch("print(1)", "", FAST).stdout == "1\n"
    for p in list(launcher._POOL._processes.values()):
        p.kill()
        p.join()
    r = launch("print(2)", "", FAST)
    assert r.status == "setup" and "launcher died" in r.reason
    assert launch("print(3)", "", FAST).stdout == "3\n"
