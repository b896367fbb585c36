"""r1 eval takes --config and section.key=value overrides like every command; its flags are shortcuts for keys, so
every engine option reaches it."""

import yaml
from conftest import run_r1

from r1cli.config import load_config
from r1cli.eval.run import EvalRequest


def _printed(*args):
    proc = run_r1("eval", *args, "--print-config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_file_then_flags_then_overrides(tmp_path):
    f = tmp_path / "eval.yaml"
    f.write_text("rollout: {engine: vllm, timeout_s: 60, vllm: {kv_cache_gb: 0.5, tensor_parallel: 2}}\n"
                 "benchmark: {benchmarks: [aime24, math500], samples: 4, temperature: 0.7}\n"
                 "data: {template: r1_zero}\n")
    cfg = _printed("--config", str(f), "--samples", "8", "--prefill", "<think>", "benchmark.samples=2")
    assert cfg["rollout"]["vllm"]["kv_cache_gb"] == 0.5 and cfg["rollout"]["vllm"]["tensor_parallel"] == 2
    assert cfg["rollout"]["timeout_s"] == 60 and cfg["data"]["template"] == "r1_zero"
    assert cfg["data"]["prefill"] == "<think>"
    assert cfg["benchmark"]["samples"] == 2  # the override wins over the flag, the flag over the file
    assert cfg["benchmark"]["temperature"] == 0.7 and cfg["benchmark"]["benchmarks"] == ["aime24", "math500"]


def test_flags_alone_give_the_old_defaults():
    cfg = _printed("--benchmarks", "gsm8k, math500", "--model", "m")
    b = cfg["benchmark"]
    assert b["benchmarks"] == ["gsm8k", "math500"] and cfg["model"]["path"] == "m"
    assert (b["samples"], b["temperature"], b["top_p"], b["max_new_tokens"], b["out"]) == (1, 0.6, 0.95, 2048,
                                                                                          "runs/eval")


def test_the_request_carries_the_engine_settings():
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", "benchmark.benchmarks=[aime24]",
                             "model.path=m", "rollout.prompts_per_generate=4"])
    req = EvalRequest.from_config(cfg)
    assert req.engine == "vllm" and req.rollout.vllm.kv_cache_gb == 0.25 and req.rollout.prompts_per_generate == 4
    assert req.benchmarks == ("aime24",) and req.model == "m"


def test_no_benchmark_is_one_line(tmp_path):
    proc = run_r1("eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == ["error: name the benchmarks: --benchmarks aime24,math500 (or "
                                              "benchmark.benchmarks=[...])"]
