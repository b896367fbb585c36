"""The SLURM batch scripts under a real one-node slurmctld + slurmd (Debian's slurm-wlm), started here with a
generated slurm.conf. Opt-in (`-m slow`): it needs root, `apt-get install slurm-wlm` and free ports.

    python -m pytest -m slow tests/e2e/test_slurm.py
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from r1cli.run.metrics import read_metrics

pytestmark = pytest.mark.slow

CONF = """ClusterName=r1test
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={port}
SlurmdPort={port1}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
MpiDefault=none
KillWait=60
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.fail("this test starts a SLURM cluster: run it as root after `apt-get install slurm-wlm`")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    port = _free_port()
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, port=port, port1=_free_port(), d=d, cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    for _ in range(60):
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
        if sinfo.stdout.strip() in ("idle", "mixed"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the SLURM node did not come up: {sinfo.stdout} {sinfo.stderr}\n"
                    + (d / "slurmctld.log").read_text()[-2000:])
    yield env
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        if (d / pid_file).exists():
            subprocess.run(["kill", (d / pid_file).read_text().strip()])


def _submit(env, tmp_path, *args, wait=True) -> subprocess.CompletedProcess:
    job_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "NPROC_PER_NODE": "1",
               "OMP_NUM_THREADS": "1"}
    cmd = ["sbatch", *(["--wait"] if wait else ["--parsable"]), "--gpus-per-node=0", "--cpus-per-task=1",
           f"--output={tmp_path}/slurm-%j.out", "--open-mode=append", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=job_env, timeout=900)


def test_one_node_script_runs_r1_sft(cluster, tiny_model, arith_data, tmp_path):
    train, _ = arith_data
    proc = _submit(cluster, tmp_path, "scripts/slurm/one-node.sbatch", "sft", "configs/tiny/sft.yaml",
                   f"model.path={tiny_model}", f"data.train={train}", "data.eval=", "train.steps=4",
                   f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false")
    out = next(tmp_path.glob("slurm-*.out")).read_text()
    assert proc.returncode == 0, proc.stderr + out[-3000:]
    assert "r1 sft on 1 node(s) x 1 process(es)" in out and "restart 0" in out
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m][-1] == 4
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def test_a_requeued_job_resumes_from_its_checkpoint(cluster, tiny_model, arith_data, tmp_path):
    """`scontrol requeue` stands in for a preemption: SLURM sends SIGTERM, r1 checkpoints the last completed step,
    the job runs again with SLURM_RESTART_COUNT=1 and the script adds --resume."""
    train, _ = arith_data
    run = tmp_path / "run"
    proc = _submit(cluster, tmp_path, "scripts/slurm/one-node.sbatch", "sft", "configs/tiny/sft.yaml",
                   f"model.path={tiny_model}", f"data.train={train}", "data.eval=", "train.steps=400",
                   f"train.output_dir={run}", "logging.tensorboard=false", wait=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline and not any(m.get("step", 0) >= 20 for m in _metrics(run)):
        time.sleep(1)
    subprocess.run(["scontrol", "requeue", job], check=True, env=cluster)
    while time.time() < deadline + 600:
        squeue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=cluster).stdout
        if not squeue.strip():
            break
        time.sleep(2)
    out = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "restart 1 (resuming)" in out and "resumed from step" in out, out[-3000:]
    steps = [m["step"] for m in _metrics(run) if "loss" in m]
    assert steps[-1] == 400 and steps == sorted(set(steps)), out[-2000:]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []
