"""The tools demo of docs/guides/tools.md (configs/tiny/tools-sft.yaml, tools.yaml), as a user runs it: the tiny
model learns to call python for products it cannot work out in its head (opt-in: -m slow, ~8 min; CI runs it as its
own step, since with a fifth of tool calls in the cold start it learned on some machines and seeds only)."""

import json

import pytest
from conftest import run_r1

from r1cli.run.metrics import read_metrics


@pytest.mark.slow
def test_the_tools_demo_learns_to_call_the_tool(tmp_path):
    def r1(*args, timeout=1800):
        proc = run_r1(*map(str, args), timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]

    quiet = ["logging.progress=false", "logging.tensorboard=false"]
    train, held = tmp_path / "mul.jsonl", tmp_path / "mul_eval.jsonl"
    r1("data", "tiny-model", "--out", tmp_path / "tiny-model")
    r1("data", "synth", "arithmetic", "--digits", "3", "--ops", "*", "--tool-share", "0.5", "--out", train,
       "--n", "4000", "--eval-out", held, "--eval-n", "200")
    data = [f"data.train={train}", f"data.eval={held}"]
    r1("sft", "--config", "configs/tiny/tools-sft.yaml", f"model.path={tmp_path / 'tiny-model'}", *data,
       f"train.output_dir={tmp_path / 'sft'}", *quiet)
    r1("rl", "--config", "configs/tiny/tools.yaml", f"model.path={tmp_path / 'sft' / 'hf'}", *data,
       f"train.output_dir={tmp_path / 'rl'}", *quiet)

    def pass1(tools: bool) -> float:
        out = tmp_path / f"eval-{tools}"
        r1("eval", "--model", tmp_path / "rl" / "hf", "--benchmarks", f"jsonl={held}", "--samples", "4",
           "--temperature", "1", "--max-new-tokens", "64", "--out", out, "rollout.max_total_tokens=128",
           *(["--tools", "python"] if tools else []))
        return json.loads((out / "summary.json").read_text())["jsonl"]["pass@1"]["value"]

    with_tool, without = pass1(True), pass1(False)
    assert with_tool - without >= 0.5, (with_tool, without)
    share = [m["tools/call_share"] for m in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "tools/call_share" in m]
    assert sum(share[-10:]) / 10 - share[0] >= 0.3, share
