"""r1 sample: filters on hand-made samples, stats that add up, SFT-ready output, and a SIGKILL that loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from r1cli.config import SampleConfig, load_config
from r1cli.rewards import RewardContext
from r1cli.run.metrics import read_metrics
from r1cli.sample.filters import rejection
from r1cli.sample.loop import run_sample

CTX = RewardContext()
CFG = SampleConfig(max_paragraph_chars=60)
GOOD = "<think>first add the units, then the tens</think><answer>42</answer>"


@pytest.mark.parametrize("text, reason", [
    (GOOD, None),
    ("first add the units <answer>42</answer>", "bad format"),
    ("<think>a</think><answer>4</answer><answer>42</answer>", "bad format"),
    ("<think>先 add 个位 then 十位 进位 了</think><answer>42</answer>", "mixed language"),
    ("<think>run this:\n```python\nprint(40 + 2)\n```</think><answer>42</answer>", "code block"),
    ("<think>" + "carry the one " * 6 + "</think><answer>42</answer>", "long paragraph"),
    ("<think>" + "carry the one\n\n" * 6 + "</think><answer>42</answer>", None),  # many short paragraphs
])
def test_filters_on_hand_made_samples(text, reason):
    assert rejection(text, {"answer": "42"}, CTX, CFG) == reason


def test_each_filter_is_a_switch():
    code = "<think>```python\nx\n```</think><answer>42</answer>"
    assert rejection(code, {}, CTX, SampleConfig(filter_code_blocks=False)) is None
    assert rejection("no tags", {}, CTX, SampleConfig(require_format=False)) is None


def sample_config(cold_start, out, *extra):
    return load_config("configs/tiny/zero.yaml", [
        f"model.path={cold_start / 'sft' / 'hf'}", f"data.train={cold_start / 'eval.jsonl'}", "rollout.n=4",
        f"sample.out={out}", "sample.keep_per_prompt=2", "sample.prompts_per_batch=8", *extra])


def test_stats_add_up_and_rows_are_sft_ready(cold_start, tmp_path):
    out = tmp_path / "s.jsonl"
    stats = run_sample(sample_config(cold_start, out, "data.max_samples=48"))["arithmetic"]
    assert stats["prompts"] == 48 and stats["samples"] == 48 * 4
    rejected = sum(v for k, v in stats.items() if k not in ("prompts", "samples", "kept"))
    assert stats["kept"] + rejected == stats["samples"] and stats["kept"] > 0 and stats["wrong answer"] > 0
    rows = read_metrics(out)
    assert len(rows) == stats["kept"] and all(r["response"].startswith("<think>") for r in rows)
    per_prompt = {}
    for r in rows:
        per_prompt[r["source"]] = per_prompt.get(r["source"], 0) + 1
        assert {"prompt", "response", "answer"} <= r.keys()
    assert max(per_prompt.values()) <= 2
    # the rows are r1 sft data as they are
    from r1cli.data.sft_examples import tokenize_rows
    from r1cli.models.loading import load_tokenizer

    cfg = load_config("configs/tiny/sft.yaml")
    assert tokenize_rows(rows, load_tokenizer(str(cold_start / "sft" / "hf")), cfg.data, str(out))


def test_a_killed_run_restarted_writes_exactly_the_uninterrupted_output(cold_start, tmp_path):
    args = ["sample", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'eval.jsonl'}", "rollout.n=4", "sample.prompts_per_batch=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from r1cli.cli import run; run()", *args]
    ref, cut = tmp_path / "ref.jsonl", tmp_path / "cut.jsonl"
    subprocess.run([*cmd, f"sample.out={ref}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*cmd, f"sample.out={cut}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = cut.with_name(cut.name + ".done")
    t0 = time.time()
    while not (done.is_file() and len(done.read_text().splitlines()) >= 40):
        assert proc.poll() is None and time.time() - t0 < 120, "finished or stalled before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(done.read_text().splitlines()) < 200  # it really was cut short
    subprocess.run([*cmd, f"sample.out={cut}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert cut.read_text() == ref.read_text()
    keys = [(r["source"], r["sample"]) for r in map(json.loads, cut.read_text().splitlines())]
    assert len(keys) == len(set(keys))


def test_two_ranks_share_the_prompts(cold_start, tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "r1cli.cli",
           "sample", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
           f"data.train={cold_start / 'eval.jsonl'}", "data.max_samples=32", "rollout.n=4", f"sample.out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = [{m["source"] for m in read_metrics(tmp_path / f"s.rank{r}.jsonl.done")} for r in (0, 1)]
    assert sources[0] == set(range(0, 32, 2)) and sources[1] == set(range(1, 32, 2))
    stats = json.loads((tmp_path / "s.jsonl.stats.json").read_text())["arithmetic"]
    assert stats["prompts"] == 32 and stats["samples"] == 128
