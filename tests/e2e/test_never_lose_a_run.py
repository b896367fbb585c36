"""A re-run, a kill, a signal or a corrupt file never destroys a user's earlier run, model or data.

End to end through the `r1` command on the tiny model: runs are cut with SIGKILL, SIGTERM and SIGINT,
checkpoints and metrics are damaged by hand, and what is left must resume to the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_r1

from r1cli.run import checkpoint as ckpt
from r1cli.run.metrics import read_metrics

FAST = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false", "data.eval=",
        "logging.every=1"]


def sft(tiny_model, arith_data, out, *extra, flags=()):
    return run_r1("sft", *flags, "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}",
                  f"data.train={arith_data[0]}", f"train.output_dir={out}", *FAST, *extra)


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl", say=lambda s: None) if "loss" in m}


def one_line(proc, needle):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_a_rerun_into_a_finished_run_refuses_and_overwrite_replaces(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    assert sft(tiny_model, arith_data, out, "train.steps=3").returncode == 0
    before = (out / "metrics.jsonl").read_text()
    one_line(sft(tiny_model, arith_data, out, "train.steps=3"),
             f"train.output_dir {out} already holds a run (checkpoints up to step_00000003); continue it with "
             "--resume, replace it with --overwrite")
    assert (out / "metrics.jsonl").read_text() == before and (out / "checkpoints" / "step_00000003").is_dir()
    one_line(sft(tiny_model, arith_data, out, flags=["--resume", "--overwrite"]), "give one of them")
    proc = sft(tiny_model, arith_data, out, "train.steps=2", "checkpoint.every=1", flags=["--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(losses(out)) == [1, 2]
    assert [d.name for d in ckpt.completed(out)] == ["step_00000002", "step_00000001"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


def test_rotation_only_deletes_this_runs_checkpoints(tmp_path):
    """Another run's newer checkpoint (left by hand, or by an older r1) survives, and never hides this run's."""
    class Saver:
        class parallel:
            is_main = True

            @staticmethod
            def barrier():
                pass

        @staticmethod
        def save(directory, extra):
            (directory / "state.txt").write_text(json.dumps(extra))

    old = ckpt.save(Saver, tmp_path, 50, keep=2, run_id="old")
    for step in (1, 2, 3):
        ckpt.save(Saver, tmp_path, step, keep=2, run_id="new")
    assert {d.name for d in ckpt.completed(tmp_path)} == {"step_00000050", "step_00000003", "step_00000002"}
    assert old.is_dir()
    found, skipped = ckpt.latest(tmp_path)
    assert found.name == "step_00000003" and not skipped


# the default run damages the weights; the optimizer and RNG files take the same path (opt-in: -m slow)
@pytest.mark.parametrize("damage", ["truncate weights", pytest.param("flip optimizer bytes", marks=pytest.mark.slow),
                                    pytest.param("delete rng", marks=pytest.mark.slow)])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tiny_model, arith_data, tmp_path, damage):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["train.steps=8", "checkpoint.every=2", "checkpoint.keep=3"]
    assert sft(tiny_model, arith_data, full, *common).returncode == 0
    assert sft(tiny_model, arith_data, cut, *common, "checkpoint.stop_after=6").returncode == 0
    newest = cut / "checkpoints" / "step_00000006"
    if damage == "truncate weights":
        w = newest / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip optimizer bytes":
        t = newest / "trainer.pt"
        data = bytearray(t.read_bytes())
        data[len(data) // 2] ^= 0xFF
        t.write_bytes(bytes(data))
    else:
        (newest / "rng_rank0.pt").unlink()
    proc = sft(tiny_model, arith_data, cut, *common, flags=["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "skipped checkpoint step_00000006:" in proc.stderr and "resumed from step 4" in proc.stderr
    assert losses(cut) == losses(full)  # steps 5..8 redone exactly as the uninterrupted run did them


@pytest.mark.parametrize("pointer", ["deleted", pytest.param("dangling", marks=pytest.mark.slow)])
def test_a_missing_latest_pointer_falls_back_to_scanning(tiny_model, arith_data, tmp_path, pointer):
    out = tmp_path / "run"
    common = ["train.steps=4", "checkpoint.every=1"]
    assert sft(tiny_model, arith_data, out, *common, "checkpoint.stop_after=3").returncode == 0
    latest = out / "checkpoints" / "latest"
    if pointer == "deleted":
        latest.unlink()
    else:
        latest.write_text("step_00000077")
    proc = sft(tiny_model, arith_data, out, *common, flags=["--resume"])
    assert proc.returncode == 0 and "resumed from step 3" in proc.stderr, proc.stderr


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_a_torn_metrics_line_is_dropped_on_resume_and_by_report(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    common = ["train.steps=5", "checkpoint.every=1"]
    assert sft(tiny_model, arith_data, out, *common, "checkpoint.stop_after=3").returncode == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed mid-write
    report = run_r1("report", str(out))
    assert report.returncode == 0 and "dropped a torn last line" in report.stderr, report.stderr
    proc = sft(tiny_model, arith_data, out, *common, flags=["--resume"])
    assert proc.returncode == 0 and "dropped a torn last line" in proc.stderr, proc.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]


def _start(tiny_model, arith_data, out, *extra):
    cmd = [sys.executable, "-c", "from r1cli.cli import run; run()", "sft", "--config", "configs/tiny/sft.yaml",
           f"model.path={tiny_model}", f"data.train={arith_data[0]}", f"train.output_dir={out}", *FAST, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_step(out, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = out / "metrics.jsonl"
        if path.is_file() and any(m["step"] >= step for m in read_metrics(path, say=lambda s: None)):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


# SIGINT takes SIGTERM's path; SIGKILL resumes from a periodic checkpoint as the corrupt-checkpoint fallbacks do, and
# test_generated_data kills r1 sample with it (both opt-in: -m slow)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_mid_run_loses_nothing(tiny_model, arith_data, tmp_path, sig):
    """SIGTERM (what SLURM sends before preempting) and Ctrl-C checkpoint the last completed step even with
    checkpoint.every=0 and exit; SIGKILL cannot be caught, so the run resumes from its last periodic
    checkpoint. Either way the resumed steps equal an uninterrupted run's."""
    out, ref = tmp_path / "cut", tmp_path / "ref"
    every = "checkpoint.every=4" if sig == signal.SIGKILL else "checkpoint.every=0"
    common = ["train.steps=400", every]
    proc = _start(tiny_model, arith_data, out, *common)
    _wait_for_step(out, 6, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), err
    done = ckpt.completed(out)
    assert done, err
    saved = int(done[0].name.split("_")[1])
    if sig != signal.SIGKILL:
        assert f"{signal.Signals(sig).name} after step {saved}: checkpoint saved to" in err
        assert "continue with --resume" in err and "Traceback" not in err
        assert saved == max(losses(out))  # the last step it logged is the one it saved
    upto = f"checkpoint.stop_after={saved + 3}"
    resumed = sft(tiny_model, arith_data, out, *common, upto, flags=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert sft(tiny_model, arith_data, ref, *common, upto).returncode == 0
    assert losses(out) == losses(ref)


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_data_commands_never_overwrite_a_model_or_leave_temp_files(tiny_model, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    one_line(run_r1("data", "tiny-model", "--out", str(model)), "already exists; pass --overwrite")
    one_line(run_r1("data", "smollm2", "--out", str(model)), "already exists; pass --overwrite")
    assert (model / "model.safetensors").read_bytes() == weights
    spec = tmp_path / "spec.yaml"
    spec.write_text("seed: 7\n")
    assert run_r1("data", "tiny-model", "--out", str(model), "--spec", str(spec), "--overwrite").returncode == 0
    assert (model / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "spec.yaml"]  # no .tmp / .old left

    folder = tmp_path / "data"
    folder.mkdir()
    one_line(run_r1("data", "synth", "arithmetic", "--out", str(folder), "--n", "10"), "is a folder")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # a checkpoint format older than the manifests (opt-in: -m slow)
def test_a_checkpoint_from_before_manifests_still_resumes(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    common = ["train.steps=4", "checkpoint.every=2"]
    assert sft(tiny_model, arith_data, out, *common, "checkpoint.stop_after=2").returncode == 0
    (out / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    proc = sft(tiny_model, arith_data, out, *common, flags=["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "has no manifest.json (an older r1 wrote it): not verified" in proc.stderr
    assert "resumed from step 2" in proc.stderr


def test_a_run_stops_with_a_checkpoint_before_the_jobs_time_limit_and_resumes(tiny_model, arith_data, tmp_path):
    """R1_STOP_AT (scripts/slurm/launch.sh sets it from the job's end time): when the next step and a checkpoint
    would end past it, the run checkpoints and exits 75 (launch.sh requeues the job); --resume goes on."""
    import time

    from conftest import run_r1

    common = ["sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}", f"data.train={arith_data[0]}",
              "data.eval=", "train.steps=4", "logging.every=1", "logging.progress=false",
              "logging.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"]
    proc = run_r1(*common, env={"R1_STOP_AT": str(time.time() + 1)})
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopping after step 1, before the job's time limit (R1_STOP_AT)" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()
    proc = run_r1(*common, "--resume", env={"R1_STOP_AT": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from r1cli.run.metrics import read_metrics

    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4]


def test_checkpoints_follow_the_wall_clock(tiny_model, arith_data, tmp_path):
    """checkpoint.every_minutes: a checkpoint whenever that much time passed since the last one."""
    from conftest import run_r1

    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}",
                  f"data.train={arith_data[0]}", "data.eval=", "train.steps=3", "checkpoint.every=0",
                  "checkpoint.keep=0", "checkpoint.every_minutes=0.0001", "logging.progress=false",
                  "logging.tensorboard=false", f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == \
        ["step_00000001", "step_00000002", "step_00000003"]
