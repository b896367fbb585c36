"""scripts/slurm/launch.sh with Slurm's commands stood in by stubs that record what they are given: srun gets the
task's CPUs (srun stopped inheriting --cpus-per-task in Slurm 22.05), r1 gets the job's end time less the margin as
R1_STOP_AT, and a run that stopped before the time limit (exit 75) is requeued. (The real slurmctld + slurmd:
tests/e2e/test_slurm.py, -m slow.)"""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

STUBS = {
    "srun": 'echo "$@" > "$LOG/srun.args"; echo "${R1_STOP_AT:-}" > "$LOG/stop_at"; exit "${FAKE_EXIT:-0}"',
    "squeue": 'echo 2030-01-01T12:00:00',
    "scontrol": 'if [ "$1" = show ]; then echo node1; else echo "$@" >> "$LOG/scontrol"; fi',
}


def _launch(tmp_path: Path, exit_code: int) -> subprocess.CompletedProcess:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(tmp_path), "FAKE_EXIT": str(exit_code),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_CPUS_PER_TASK": "64", "R1_STOP_MARGIN_S": "900"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "launch.sh"), "rl", "configs/zero.yaml"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def test_srun_gets_the_cpus_and_r1_gets_the_deadline(tmp_path):
    proc = _launch(tmp_path, 0)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--cpus-per-task=64" in args and "--nproc_per_node 8" in args
    end = int(subprocess.run(["date", "-d", "2030-01-01T12:00:00", "+%s"], capture_output=True,
                             text=True).stdout)
    assert int((tmp_path / "stop_at").read_text()) == end - 900
    assert not (tmp_path / "scontrol").exists()


@pytest.mark.parametrize("code, requeued", [(75, True), (1, False)])
def test_a_run_stopped_before_the_time_limit_is_requeued(tmp_path, code, requeued):
    proc = _launch(tmp_path, code)
    assert proc.returncode == (0 if requeued else code), proc.stderr
    log = tmp_path / "scontrol"
    assert (log.is_file() and log.read_text().split() == ["requeue", "77"]) == requeued
