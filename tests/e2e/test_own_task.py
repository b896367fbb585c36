"""Bring your own task: a data file and a reward file in a folder of the user's, named from the config - no file of
r1 edited - drive `r1 rl` (and load on every rank under torchrun)."""

import json
import random

import pytest
from conftest import run_r1, torchrun

from r1cli.run.metrics import read_metrics

REWARD_FILE = '''
import re

from r1cli.rewards import reward


@reward("even_answer")
def even_answer(completion, row, ctx):
    """1 when the final answer is an even number."""
    m = re.search(r"<answer>\\s*(-?\\d+)\\s*</answer>", ctx.full(completion))
    return float(m is not None and int(m.group(1)) % 2 == 0)
'''


def _task(folder):
    folder.mkdir()
    (folder / "even.py").write_text(REWARD_FILE)
    r = random.Random(0)
    rows = [{"question": f"{r.randint(10, 99)}+{r.randint(10, 99)}=?"} for _ in range(400)]
    (folder / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_a_task_r1_has_never_seen_is_learned_from_two_files(cold_start, tmp_path):
    task = _task(tmp_path / "my_task")
    args = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={task / 'questions.jsonl'}", "data.eval=", "data.prompt_field=question",
            f"plugins=[{task / 'even.py'}]", "rewards.weights={even_answer: 1.0}", "train.steps=20",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false",
            "logging.sample_every=0"]
    learn = run_r1(*args, f"train.output_dir={tmp_path / 'learn'}", env={"OMP_NUM_THREADS": "2"})
    assert learn.returncode == 0, learn.stderr[-3000:]
    frozen = torchrun(2, *args, "optim.lr=0", f"train.output_dir={tmp_path / 'frozen'}")  # every rank imports it
    assert frozen.returncode == 0, frozen.stderr[-3000:]
    curve = lambda run: [m["reward/even_answer"] for m in read_metrics(tmp_path / run / "metrics.jsonl")  # noqa
                         if "reward/even_answer" in m]
    a, b = curve("learn"), curve("frozen")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(a[-5:]) - mean(a[:5]) >= 0.30, a
    assert abs(mean(b[-5:]) - mean(b[:5])) < 0.15, b


def test_data_prepare_on_the_command_line(tmp_path):
    src = tmp_path / "numina.jsonl"
    src.write_text(json.dumps({"problem": "Find x.", "solution": "x = \\boxed{4}"}) + "\n"
                   + json.dumps({"problem": "Prove it.", "solution": "...", "answer": "proof"}) + "\n")
    out = tmp_path / "rows.jsonl"
    proc = run_r1("data", "prepare", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"read 2 rows from {src}; wrote 1 to {out}" in proc.stdout
    assert "dropped 1: answer column says 'proof'" in proc.stdout
    assert json.loads(out.read_text()) == {"prompt": "Find x.", "answer": "4", "task": "math",
                                           "response": "x = \\boxed{4}"}
    again = run_r1("data", "prepare", str(src), "--out", str(out))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
