"""rollout: how completions are generated (engine, sampling, tools, asynchrony)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1cli.config.fields import bounded, named, owned


@dataclass
class VLLMEngineConfig:
    """rollout.engine=vllm only."""

    # the process's share of GPU memory that weights + KV cache may fill (CPU build: of the NUMA node's RAM,
    # counting everything the process holds, the trainer included)
    gpu_memory_utilization: float = bounded(0.5, 0.0, 1.0, above=True)
    kv_cache_gb: float = bounded(0.0, 0.0)  # an explicit KV-cache size instead; 0: from gpu_memory_utilization
    tensor_parallel: int = bounded(1, 1)  # engine TP (may differ from the trainer's)
    weight_bucket_mb: int = bounded(512, 1)  # weights move to the engine this many MB at a time
    # GPU, while the trainer runs: 2 frees the KV cache and discards the weights (reloaded after each step anyway),
    # 1 offloads the weights to host memory instead; 0: no sleep
    sleep_level: int = bounded(2, 0, 2)
    max_model_len: int = bounded(0, 0)  # 0: the model's context length
    enforce_eager: bool = False  # GPU: no CUDA graphs (always eager on CPU)
    # a seed per request (reproducible, sharding-invariant samples) costs vLLM its fast batched sampler on a GPU:
    # auto seeds on the CPU only
    seed_requests: Literal["auto", "always", "never"] = "auto"


@dataclass
class RolloutConfig:
    engine: str = named("auto", "r1cli.interfaces:ENGINES")  # auto: vllm on a GPU where installed, else hf
    n: int = bounded(8, 1)  # G: samples per prompt
    temperature: float = bounded(1.0, 0.0)  # sampling temperature; 0: greedy
    # nucleus sampling: the smallest set of tokens holding this much probability
    top_p: float = bounded(1.0, 0.0, 1.0, above=True)
    top_k: int = bounded(0, 0)  # 0: off
    max_new_tokens: int = bounded(512, 1)  # tokens per completion (per turn with tools)
    # generation ends after any of these strings (kept in the completion)
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    # prompts handed to the engine in one call (memory); 0: the engine's choice (hf: 8, vllm: all of them)
    prompts_per_generate: int = bounded(0, 0)
    # hf engine: size each generate call by tokens instead - as many prompts as keep rows x (longest prompt +
    # max_new_tokens) within this budget (the KV cache a call holds), so short tasks take few large calls and long
    # ones stay within memory; 0: prompts_per_generate. vLLM schedules by tokens itself
    tokens_per_generate: int = bounded(0, 0)
    # every wait on the engine (generate, weight sync, sleep/wake) ends with a message after this long; 0: never
    timeout_s: float = bounded(1800.0, 0.0)
    start_timeout_s: float = bounded(1800.0, 0.0)  # building the engine (vLLM loads, profiles, compiles)
    # truncated importance sampling: the loss of token t is weighted by min(p_trainer / p_engine, tis_cap),
    # correcting for the engine sampling from a slightly different distribution; 0: off
    tis_cap: float = bounded(0.0, 0.0)
    # masked importance sampling (MIS, IcePop): tokens whose p_trainer / p_engine lies outside [mis_low, mis_high]
    # are left out of the loss instead of reweighted - every token of the sample at mis_level=sequence, judged by its
    # geometric-mean ratio; 0: off. Beside tis_cap or alone; logged as rollout/mis_masked (share of tokens)
    mis_low: float = bounded(0.0, 0.0)
    mis_high: float = bounded(0.0, 0.0)  # the upper bound of the ratio a token keeps (with mis_low)
    mis_level: Literal["token", "sequence"] = "token"  # judge each token, or each sample by its geometric mean
    # one-step-off-policy: step k+1's samples are generated (in a thread, by an engine holding its own copy of the
    # weights one update behind) while step k trains; the update corrects for the stale samples with TIS against
    # the engine's log-probs (rollout.tis_cap); `r1 rl` only
    asynchronous: bool = False
    # fully asynchronous (K >= 1): a rollout worker process generates step s under the weights of version s - K
    # (after s - K updates) while the trainer trains, up to K steps ahead; every sample is at most K updates old,
    # corrected by TIS (rollout.tis_cap) against the worker's own log-probs; exact on resume. 0: off. `r1 rl` only
    max_staleness: int = bounded(0, 0)
    # with max_staleness: continuous generation in pieces of partial_tokens tokens over a pool of up to partial_rows
    # samples from as many steps as have arrived, under the newest weights at each piece: a long answer no longer
    # holds up the short ones, and finishes under fresher weights (not bit-reproducible then)
    partial: bool = False
    partial_tokens: int = bounded(32, 1)  # rollout.partial: tokens generated per piece before the weights may change
    partial_rows: int = bounded(256, 1)  # rollout.partial: samples in generation at once
    # multi-turn rollouts with tools (r1cli.tools): names from the registry (python, calculator) or path.py:function;
    # a turn that ends with a call gets the tool's output and goes on. tool_format: fenced (a block fenced with the
    # tool's name, then "```output"; base models, the R1 template) or chat (the model's own <tool_call> JSON,
    # the tools described by its chat template; instruct models)
    tools: list[str] = field(default_factory=list)
    tool_format: Literal["fenced", "chat"] = "fenced"  # fenced or chat, as described above
    max_turns: int = bounded(4, 1)  # model turns per sample
    max_total_tokens: int = bounded(0, 0)  # completion tokens per sample, tool output included; 0: max_new_tokens
    tool_timeout_s: float = bounded(10.0, 0.0, above=True)  # per call
    tool_output_chars: int = bounded(1000, 1)  # a call's output is cut here, with a note
    tool_state: Literal["persist", "fresh"] = "persist"  # python: a sample's earlier calls run again before each
    vllm: VLLMEngineConfig = owned(VLLMEngineConfig, "rollout.engine", ("vllm", "auto"))
