"""One writer per output folder, no results continued or reported under other inputs, no resume loop."""

import json
import subprocess
import sys

import pytest
import store_driver
from conftest import ROOT
from test_never_lose_a_run import one_line, sft

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.eval.run import EvalRequest, run_eval
from r1cli.run import folder_lock
from r1cli.run.harness import check_run_dir
from r1cli.run.identity import fingerprint
from r1cli.sample.store import ResumableOutput


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder's lock until it is killed."""
    procs = []

    def start(folder, name=".r1.lock"):
        code = (f"from r1cli.run.folder_lock import hold; hold({str(folder)!r}, 'x', {name!r}); print('held', "
                "flush=True); import time; time.sleep(600)")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_process_is_refused_until_the_first_dies(tmp_path, holder):
    folder = tmp_path / "out"
    proc = holder(folder)
    with pytest.raises(R1Error, match=f"in use by another r1 process \\(pid {proc.pid} on "):
        folder_lock.hold(folder, "--out")
    proc.kill()  # SIGKILL: no clean-up ran, the kernel released the lock
    proc.wait()
    folder_lock.hold(folder, "--out")
    folder_lock.hold(folder, "--out")  # the holder itself may take it again


def test_every_writing_command_takes_its_folders_lock(tmp_path, holder):
    out = tmp_path / "s.jsonl"
    holder(tmp_path, "s.jsonl.lock")
    with pytest.raises(R1Error, match="sample.out .* is in use"):
        ResumableOutput(out, store_driver.OneProcess())
    holder(tmp_path / "eval")
    comp = tmp_path / "c.jsonl"
    comp.write_text(json.dumps({"benchmark": "gsm8k", "id": "0", "completion": "x"}) + "\n")
    with pytest.raises(R1Error, match="--out .* is in use"):
        run_eval(EvalRequest(("gsm8k=" + str(_gsm8k(tmp_path)),), str(tmp_path / "eval"), completions=str(comp)))
    holder(tmp_path / "run")
    cfg = load_config("configs/tiny/sft.yaml", [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(R1Error, match="train.output_dir .* is in use"):
        check_run_dir(cfg, False, False)


def _gsm8k(tmp_path):
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"so #### {i + 1}"}) + "\n"
                         for i in range(3)))
    return f


def test_eval_never_reports_results_of_other_completions_or_settings(tmp_path):
    bench = _gsm8k(tmp_path)
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    for f, add in ((right, 1), (wrong, 5)):
        f.write_text("".join(json.dumps({"benchmark": "gsm8k", "id": str(i), "completion":
                                         f"<answer>{i + add}</answer>"}) + "\n" for i in range(3)))
    out = str(tmp_path / "eval")
    req = EvalRequest((f"gsm8k={bench}",), out, completions=str(right))
    assert run_eval(req)["gsm8k"]["pass@1"]["value"] == 1.0
    with pytest.raises(R1Error, match=r"--out .* holds results made with other inputs \(completions \(content\) "):
        run_eval(EvalRequest((f"gsm8k={bench}",), out, completions=str(wrong)))
    bench.write_text(bench.read_text().replace("#### 1", "#### 7"))  # the benchmark itself changed
    with pytest.raises(R1Error, match="benchmark gsm8k \\(content\\)"):
        run_eval(req)
    assert run_eval(EvalRequest((f"gsm8k={bench}",), str(tmp_path / "fresh"), completions=str(wrong)))[
        "gsm8k"]["pass@1"]["value"] == 0.0


def test_sample_output_of_other_inputs_is_refused_and_overwrite_starts_again(tmp_path):
    out = tmp_path / "s.jsonl"
    ResumableOutput(out, store_driver.OneProcess(), identity={"model.path (content)": "aa", "rollout.n": 4})
    with pytest.raises(R1Error, match=r"holds results made with other inputs \(model.path \(content\) aa -> bb, "
                                      r"rollout.n 4 -> 8\); --overwrite starts it again"):
        ResumableOutput(out, store_driver.OneProcess(), identity={"model.path (content)": "bb", "rollout.n": 8})
    ResumableOutput(out, store_driver.OneProcess(), overwrite=True, identity={"model.path (content)": "bb"})


def test_a_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 50_000)  # past the whole-file limit
    assert fingerprint(a) == fingerprint(b)
    with (b / "model.safetensors").open("r+b") as f:  # a retrained model: other bytes in the same shapes
        f.seek(6_400_000)
        f.write(b"\1")
    assert fingerprint(a) != fingerprint(b)


def test_no_resume_loop_a_run_that_never_started_is_started_again(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("configs/tiny/sft.yaml", [f"train.output_dir={run}"])
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")  # what a run that failed before its first step leaves
    (run / "tensorboard").mkdir()
    check_run_dir(cfg, False, False)  # a plain rerun is accepted
    with pytest.raises(R1Error, match="no intact checkpoint .*nothing was checkpointed there yet: run without "
                                      "--resume"):
        check_run_dir(cfg, True, False)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # it did train, without a checkpoint: nothing to resume
    with pytest.raises(R1Error, match="start it again with --overwrite"):
        check_run_dir(cfg, True, False)
    with pytest.raises(R1Error, match="already holds a run"):
        check_run_dir(cfg, False, False)


def test_a_resume_with_other_inputs_is_refused_before_any_model_loads(tiny_model, arith_data, tmp_path):
    out = tmp_path / "run"
    assert sft(tiny_model, arith_data, out, "train.steps=2", "checkpoint.every=1").returncode == 0
    proc = sft(tiny_model, arith_data, out, "train.steps=3", "optim.lr=0.5", flags=["--resume"])
    one_line(proc, f"train.output_dir {out} holds results made with other inputs (optim.lr ")
    assert "--overwrite starts it again" in proc.stderr
    proc = sft(tiny_model, arith_data, out, "train.steps=3", flags=["--resume"])  # more steps: the same run
    assert proc.returncode == 0, proc.stderr
