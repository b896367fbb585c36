"""r1 sample: filters on hand-made samples, stats that add up, SFT-ready output, and a SIGKILL that loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from r1cli.config import FilterConfig, load_config
from r1cli.errors import R1Error
from r1cli.rewards import RewardContext
from r1cli.run.metrics import read_metrics
from r1cli.sample.filters import rejection
from r1cli.sample.loop import run_sample

CTX = RewardContext()
CFG = FilterConfig(max_paragraph_chars=60, max_response_tokens=50)
GOOD = "<think>first add the units, then the tens</think><answer>42</answer>"


@pytest.mark.parametrize("text, reason", [
    (GOOD, None),
    ("first add the units <answer>42</answer>", "bad format"),
    ("<think>first add the units, then the tens</think>", "no final answer"),
    ("<think>units, tens</think><answer> </answer>", "no final answer"),
    ("<think>a</think><answer>4</answer><answer>42</answer>", "no final answer"),  # a hedge answers nothing
    ("<think>先 add 个位 then 十位 进位 了</think><answer>42</answer>", "mixed language"),
    ("<think>run this:\n```python\nprint(40 + 2)\n```</think><answer>42</answer>", "code block"),
    ("<think>" + "carry the one " * 6 + "</think><answer>42</answer>", "long paragraph"),
    ("<think>" + "carry the one\n\n" * 6 + "</think><answer>42</answer>", None),  # many short paragraphs
])
def test_filters_on_hand_made_samples(text, reason):
    assert rejection(text, {"answer": "42"}, CTX, CFG) == reason


def test_each_filter_is_a_switch():
    code = "<think>```python\nx\n```</think><answer>42</answer>"
    assert rejection(code, {}, CTX, FilterConfig(code_blocks=False)) is None
    assert rejection("no think tags <answer>42</answer>", {}, CTX, FilterConfig(require_format=False)) is None
    assert rejection(GOOD, {}, CTX, CFG, n_tokens=51) == "over-long"
    assert rejection(GOOD, {}, CTX, FilterConfig(), n_tokens=10**6) is None  # max_response_tokens=0: off


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


@pytest.mark.slow  # opt-in since the default run passed 15 minutes; test_generated_data.py keeps signal-restart
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
    merged = read_metrics(out)  # one SFT-ready file for the next stage, in prompt order
    assert len(merged) == stats["kept"] and [r["source"] for r in merged] == sorted(r["source"] for r in merged)


def test_judge_reads_yes_and_no():
    from r1cli.parsing import verdict

    assert verdict(" Yes.") and verdict("yes, it is") and verdict("**YES**")
    assert not verdict("No") and not verdict("") and not verdict("yesterday") and not verdict("The answer is yes")


def test_prompts_without_answers_go_to_the_judge(cold_start, tmp_path, monkeypatch):
    """Rows without an answer are an error without sample.judge; with one, its verdict decides what is kept
    and the record says it was judged. The judge here knows the sums (it recomputes them from the question),
    so what it keeps must be exactly the samples whose final answer is the true sum."""
    from r1cli.parsing import final_answer_of
    from r1cli.sample import judge as judge_mod

    rows = read_metrics(cold_start / "eval.jsonl")[:16]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer" or i % 2}) + "\n"
                            for i, r in enumerate(rows)))
    with pytest.raises(R1Error, match=r"q.jsonl:1: no 'answer'.*sample.judge"):
        run_sample(sample_config(cold_start, tmp_path / "x.jsonl", f"data.train={data}"))

    seen = []

    class SumJudge:
        def __call__(self, question, responses):
            seen.append(question)
            a, b = question.rstrip("=?").split("+")
            return [final_answer_of(r) == str(int(a) + int(b)) for r in responses]

    monkeypatch.setattr(judge_mod.AnswerJudge, "from_config", classmethod(lambda cls, cfg: SumJudge()))
    out = tmp_path / "j.jsonl"
    stats = run_sample(sample_config(cold_start, out, f"data.train={data}", "sample.judge=/some/judge",
                                     "sample.keep_per_prompt=4"))["arithmetic"]
    assert sorted(seen) == sorted(r["prompt"] for r in rows[::2])
    kept = read_metrics(out)
    assert {r["verified"] for r in kept if r["source"] % 2 == 0} <= {"judge"}
    assert {r["verified"] for r in kept if r["source"] % 2} <= {"rule"}
    for r in kept:
        assert final_answer_of(r["response"]) == rows[r["source"]]["answer"]
    assert stats["judged wrong"] > 0 and stats["wrong answer"] > 0
    assert any(r["verified"] == "judge" for r in kept)
