"""Typed run configuration: dataclasses per concern, YAML files, `a.b=c` overrides.

Every key is checked: an unknown key names the closest valid one, a value of
the wrong type names the key, the value and the type it should have.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from r1cli.errors import R1Error


def _configs_folder() -> Path:
    """The folder of the shipped YAML: `configs/` of a checkout, or `r1cli/configs` inside an installed wheel."""
    import importlib.util

    spec = importlib.util.find_spec("r1cli.configs")
    if spec is None or not spec.submodule_search_locations:
        raise R1Error("the shipped configs (package r1cli.configs) are missing from this install; reinstall r1")
    return Path(next(iter(spec.submodule_search_locations)))


CONFIG_DIR = _configs_folder()  # presets: students/, tiny/, the pipelines


def resolve_config(path: str | Path) -> Path:
    """A config file named on the command line: a path that exists from the working folder wins; otherwise
    `configs/X.yaml` (or `X.yaml`) is looked up among the shipped configs, so they resolve after `pip install .`."""
    p = Path(path)
    if p.exists():
        return p
    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    if not p.is_absolute() and (CONFIG_DIR / rel).is_file():
        return CONFIG_DIR / rel
    return p


def shipped_configs() -> list[str]:
    """Every shipped config as `configs/...` (the name --config takes from any folder)."""
    return sorted(f"configs/{f.relative_to(CONFIG_DIR).as_posix()}" for f in CONFIG_DIR.rglob("*.yaml"))


def named(default: str, registry: str):
    """A field whose valid values are the names in a registry ("module:ATTR"): one definition of the names."""
    return field(default=default, metadata={"registry": registry})


def bounded(default, low=None, high=None, *, above: bool = False):
    """A number with its valid range beside it: >= low (> low with above=True) and <= high."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the torch backend: the base weights stay frozen (in the compute dtype), only the
    adapters train, the reference policy is the base with the adapters switched off, checkpoints hold the adapters."""

    rank: int = bounded(0, 0)  # 0: off (full fine-tuning)
    alpha: float = bounded(16.0, 0.0, above=True)  # the update is (alpha / rank) B A (alpha / sqrt(rank) with rslora)
    dropout: float = bounded(0.0, 0.0, 1.0)
    # module names (the last part of a layer's name) that get adapters; all-linear: every linear layer but lm_head
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    layers: list[int] = field(default_factory=list)  # decoder layer indices that get adapters; empty: every layer
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)


@dataclass
class ModelConfig:
    path: str = ""  # a local Hugging Face folder (config.json, *.safetensors, tokenizer)
    # parameter dtype for training; auto: fp32 master weights (and optimizer state) with bf16 compute on GPU, fp32
    # on CPU; bf16-mixed: that mixed precision on any device (the GPU path, run on a CPU)
    dtype: Literal["auto", "bf16-mixed", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # fp8 (parallel.backend=megatron, Transformer Engine, Hopper-class GPU): the linear layers compute in FP8
    # (E4M3 forward, E5M2 gradients) over bf16 weights with fp32 master copies
    precision: Literal["auto", "fp8"] = "auto"
    fp8_recipe: Literal["delayed", "current"] = "delayed"  # scaling from an amax history, or from this tensor
    lora: LoraConfig = field(default_factory=LoraConfig)


def owned(factory, key: str, values: tuple[str, ...]):
    """A sub-section read only when config key `key` is one of `values`; set otherwise, it is refused."""
    return field(default_factory=factory, metadata={"owner": (key, values)})


@dataclass
class DataConfig:
    # JSONL, Parquet, Arrow, a folder of them, or a datasets save_to_disk folder (local paths)
    train: str = ""
    eval: str = ""  # held-out set (same formats), optional
    # source column -> the name r1 reads, applied as rows are read: {problem: prompt, solution: response}
    columns: dict[str, str] = field(default_factory=dict)
    prompt_field: str = "prompt"
    response_field: str = "response"
    answer_field: str = "answer"
    messages_field: str = "messages"
    task_field: str = "task"  # which checker verifies a row (math, arithmetic, countdown)
    # r1_zero_chat: the paper's template as the user turn of the chat template
    template: Literal["chat", "r1_zero", "r1_zero_chat", "plain"] = "chat"
    system_prompt: str = ""
    prefill: str = ""  # text the assistant turn starts with, e.g. "<think>"
    # extra variables for the tokenizer's chat template, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str = ""  # a Jinja chat template file of your own, used instead of the tokenizer's
    max_seq_len: int = bounded(1024, 1)
    pack: bool = True
    # SFT: a tool's output inside a response (the contents of ```output blocks, as rollout.tools writes them) is
    # context, not a target, as in RL
    mask_tool_output: bool = True
    shuffle: bool = True
    max_samples: int = bounded(0, 0)  # 0: all
    max_line_mb: int = bounded(64, 1)  # longest JSONL line read
    # RL prompts longer than this many tokens (0: the model's context less rollout.max_new_tokens) are
    # dropped and counted, or with long_prompts=error the first is an error
    max_prompt_tokens: int = bounded(0, 0)
    long_prompts: Literal["drop", "error"] = "drop"


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"
    steps: int = bounded(100, 1)
    micro_batch_size: int = bounded(8, 1)  # rows per forward (packed rows when data.pack)
    # > 0: each forward takes samples of at most this many tokens in all instead of micro_batch_size padded rows,
    # laid back to back into rows as wide as its longest (Megatron: one row), positions restarting and attention
    # within each sample; first-fit decreasing by length, a longer sample alone. Long-tailed RL: far less padding
    # auto: the most the memory plan says one micro-batch's activations may take on this device (GPU: its memory
    # less the resident rows; CPU: the memory available), printed at start and logged as train/token_budget
    max_tokens_per_micro_batch: int | Literal["auto"] = bounded(0, 0)
    grad_accum: int = bounded(1, 1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, reference elsewhere


@dataclass
class OptimConfig:
    lr: float = bounded(1e-5, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    beta1: float = bounded(0.9, 0.0, 1.0)
    beta2: float = bounded(0.95, 0.0, 1.0)
    eps: float = bounded(1e-8, 0.0, above=True)
    warmup_steps: int = bounded(0, 0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)
    grad_clip: float = bounded(1.0, 0.0)  # 0: off


@dataclass
class TorchBackendConfig:
    """parallel.backend=torch only (transformers models, DDP / FSDP2)."""

    # ddp: every rank a whole replica, gradients averaged over the ranks after each step's micro-batches (by r1, not
    # torch's DDP hooks, so that an out-of-memory micro-batch can be split and redone); fsdp: FSDP2 shards
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    # GRPO loss from hidden states: "recompute" keeps the least memory (logits recomputed in the backward),
    # "one_pass" forms the gradient in the forward (a quarter fewer matmul flops, an fp32 [V x H] accumulator)
    fused_linear: Literal["recompute", "one_pass"] = "recompute"


@dataclass
class MegatronBackendConfig:
    """parallel.backend=megatron only (megatron-core GPTModel, its DDP and optimizer)."""

    # activations split over the TP ranks along the sequence between the TP regions (needs TP > 1)
    sequence_parallel: bool = False
    # Adam state and fp32 master weights sharded over the data-parallel ranks (ZeRO-1)
    distributed_optimizer: bool = True
    # the layers: te = Transformer Engine's (flash attention, packed rows as THD sequences; FP8 needs them), local =
    # megatron's plain torch layers (attention materialises [heads, S, S] scores: CPU and small runs); auto: te on a
    # GPU where transformer_engine imports, else local
    layers: Literal["auto", "te", "local"] = "auto"
    # what model.gradient_checkpointing recomputes in the backward: full = every layer from its input (the least
    # memory); selective = the attention's core alone (its softmax and, with the local layers, the [S x S] scores;
    # megatron-core's core_attn), keeping the rest
    recompute: Literal["full", "selective"] = "full"
    # DeepSeek-V3's aux-free balancing: after each step every router's expert bias moves by this much toward the
    # experts that got fewer tokens than the mean (megatron-core's update; DeepSeek-V3's pre-training used 0.001).
    # 0 keeps the checkpoint's bias, as transformers (parallel.backend=torch) trains it
    expert_bias_update_rate: float = bounded(0.0, 0.0)


@dataclass
class ParallelConfig:
    backend: str = named("torch", "r1cli.interfaces:TRAINERS")  # trainer backend
    tensor_parallel: int = bounded(1, 1)  # model-parallel backends (megatron)
    pipeline_parallel: int = bounded(1, 1)
    # mixtures of experts on megatron: the experts split over this many of the data-parallel ranks (all-to-all
    # token dispatch); every other weight stays replicated over data parallelism
    expert_parallel: int = bounded(1, 1)
    # long sequences: each sequence's tokens split over this many ranks (world = data x context parallel); torch
    # backend: Ulysses attention (heads split by an all-to-all), the micro-batch one packed row; megatron: needs
    # Transformer Engine's attention
    context_parallel: int = bounded(1, 1)
    # how long a collective waits for the slowest rank before the run stops (NCCL's default is 10 min; rank 0
    # writing a 7B model's optimizer state, or one rank's long generations, can take longer)
    timeout_min: float = bounded(30.0, 0.0, above=True)
    torch: TorchBackendConfig = owned(TorchBackendConfig, "parallel.backend", ("torch",))
    megatron: MegatronBackendConfig = owned(MegatronBackendConfig, "parallel.backend", ("megatron",))


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
    temperature: float = bounded(1.0, 0.0)
    top_p: float = bounded(1.0, 0.0, 1.0, above=True)
    top_k: int = bounded(0, 0)  # 0: off
    max_new_tokens: int = bounded(512, 1)
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
    partial_tokens: int = bounded(32, 1)
    partial_rows: int = bounded(256, 1)
    # multi-turn rollouts with tools (r1cli.tools): names from the registry (python, calculator) or path.py:function;
    # a turn that ends with a call gets the tool's output and goes on. tool_format: fenced (a block fenced with the
    # tool's name, then "```output"; base models, the R1 template) or chat (the model's own <tool_call> JSON,
    # the tools described by its chat template; instruct models)
    tools: list[str] = field(default_factory=list)
    tool_format: Literal["fenced", "chat"] = "fenced"
    max_turns: int = bounded(4, 1)  # model turns per sample
    max_total_tokens: int = bounded(0, 0)  # completion tokens per sample, tool output included; 0: max_new_tokens
    tool_timeout_s: float = bounded(10.0, 0.0, above=True)  # per call
    tool_output_chars: int = bounded(1000, 1)  # a call's output is cut here, with a note
    tool_state: Literal["persist", "fresh"] = "persist"  # python: a sample's earlier calls run again before each
    vllm: VLLMEngineConfig = owned(VLLMEngineConfig, "rollout.engine", ("vllm", "auto"))


@dataclass
class RewardModelConfig:
    """The reward_model reward (rewards.weights.reward_model): a local Hugging Face sequence-classification model
    scores each (prompt, response) conversation; its first logit is the reward."""

    path: str = ""
    batch_size: int = bounded(16, 1)
    normalize: Literal["none", "sigmoid", "batch"] = "none"  # batch: z-scores over the step's samples
    offload: bool = True  # on a GPU: to host memory between scoring calls (the trainer needs the memory)
    max_tokens: int = bounded(4096, 1)  # longer conversations keep their last max_tokens tokens


@dataclass
class JudgeRewardConfig:
    """The judge reward (rewards.weights.judge): a local generative model, through the rollout engine registry,
    reads each answer and gives a verdict (yes / no) or a score; cached per (prompt, response)."""

    path: str = ""
    engine: str = named("auto", "r1cli.interfaces:ENGINES")  # its own engine (rollout.vllm's settings apply)
    # a template file with {question}, {response}, {reasoning}, {answer} and {reference} (the row's answer); empty:
    # the built-in yes/no question
    template: str = ""
    verdict: Literal["yes_no", "score"] = "yes_no"  # score: the reply's first number divided by max_score
    max_score: float = bounded(10.0, 0.0, above=True)
    max_new_tokens: int = bounded(16, 1)


@dataclass
class RewardsConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1},
                                      metadata={"registry": "r1cli.rewards:REWARDS"})
    language: str = "en"  # target language of the chain of thought (language reward)
    # a chain of thought with fewer words earns no language reward (an empty or digits-only one would score 1.0)
    language_min_words: int = bounded(8, 0)
    # a reward call (one sample, or one batch per sample in it) running longer is that sample's 0, counted in
    # reward_failures/NAME; 0: no limit
    timeout_s: float = bounded(60.0, 0.0)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    judge: JudgeRewardConfig = field(default_factory=JudgeRewardConfig)


@dataclass
class GRPOConfig:
    prompts_per_step: int = bounded(32, 1)  # global, across ranks
    mu: int = bounded(1, 1)  # optimisation passes over each rollout batch
    mini_batch_size: int = bounded(0, 0)  # sequences per optimizer step; 0: the whole batch
    # the old policy's log-probs: auto leaves out their no-grad forward when the step's one update is on-policy
    # (mu 1, one mini-batch, no TIS, no KL in the reward, no one-pass kernel): the ratio is then exactly 1 and
    # the gradient the same; recompute always runs it
    old_logprobs: Literal["auto", "recompute"] = "auto"
    eps_low: float = bounded(0.2, 0.0)
    eps_high: float = bounded(0.2, 0.0)
    dual_clip: float = bounded(0.0, 0.0)  # c > 1 enables dual clip for negative advantages; 0: off
    ratio_level: str = named("token", "r1cli.rl.losses:RATIO_LEVELS")  # sequence: GSPO
    # seq-mean-token-mean (paper), token-mean (DAPO), seq-mean-token-sum-norm (Dr. GRPO)
    loss_agg: str = named("seq-mean-token-mean", "r1cli.rl.losses:AGGREGATIONS")
    advantage: str = named("grpo", "r1cli.rl.advantages:ADVANTAGES")  # grpo, drgrpo, rloo
    adv_eps: float = bounded(1e-6, 0.0)  # added to the group std before dividing
    beta: float = bounded(0.001, 0.0)  # KL weight; 0 loads no reference model
    kl_estimator: str = named("k3", "r1cli.rl.losses:KL_ESTIMATORS")  # k1, k2, k3
    kl_in_reward: bool = False
    ref_update_every: int = bounded(0, 0)  # refresh the reference from the policy every N steps; 0: never
    drop_equal_groups: bool = False  # dynamic sampling: groups whose rewards are all equal carry no signal
    # DAPO dynamic sampling: groups whose rewards are all equal are replaced by groups of further prompts, drawn in
    # rounds of prompts_per_step from their own seeded stream, until the step holds prompts_per_step groups with
    # signal or max_sampling_rounds rounds were generated (then the rest are groups without signal, weighted 0)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = bounded(3, 1)
    overlong_buffer: int = bounded(0, 0)  # DAPO soft overlong penalty over the last N tokens; 0: off
    overlong_penalty: float = bounded(1.0, 0.0)
    overlong_filter: bool = False  # truncated samples take no part in the loss
    entropy_coef: float = bounded(0.0, 0.0)
    log_ratio_clamp: float = bounded(20.0, 0.0, above=True)
    max_bad_steps: int = bounded(3, 1)  # stop after this many non-finite steps in a row


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training: pass@1 as the mean over n samples per prompt."""

    every: int = bounded(0, 0)  # steps between evaluations; 0: only before and after training
    samples: int = bounded(64, 1)  # held-out rows used
    n: int = bounded(1, 1)  # samples per held-out prompt
    temperature: float = bounded(0.0, 0.0)  # 0: greedy
    top_p: float = bounded(1.0, 0.0, 1.0, above=True)
    max_new_tokens: int = bounded(256, 1)


@dataclass
class BenchmarkConfig:
    """r1 eval: benchmarks scored by pass@1 (mean over `samples` per problem), cons@k and pass@k; the model is
    model.path, the prompt data.template / data.prefill, the engine rollout.engine and its sub-section."""

    benchmarks: list[str] = field(default_factory=list)  # NAME or NAME=PATH (aime24, math500, gsm8k, humaneval...)
    data_dir: str = ""  # folder with each benchmark's default file
    out: str = "runs/eval"  # samples.jsonl and summary.json
    completions: str = ""  # JSONL of existing {benchmark, id, completion} to score instead of generating
    samples: int = bounded(1, 1)  # k per problem
    temperature: float = bounded(0.6, 0.0)  # DeepSeek-R1's evaluation settings
    top_p: float = bounded(0.95, 0.0, 1.0, above=True)
    max_new_tokens: int = bounded(2048, 1)
    limit: int = bounded(0, 0)  # problems per benchmark; 0: all
    seed: int = 0
    code_workers: int = bounded(0, 0)  # sandbox pool size for code benchmarks; 0: twice the cores


@dataclass
class LoggingConfig:
    every: int = bounded(1, 1)
    # where scalars and sample tables go besides metrics.jsonl (always written): tensorboard, wandb, mlflow, jsonl
    # (r1cli.run.loggers; a plugin may register its own)
    backends: list[str] = field(default_factory=lambda: ["tensorboard"],
                                metadata={"registry": "r1cli.run.loggers:LOGGERS"})
    project: str = "r1"  # the W&B project / MLflow experiment
    tensorboard: bool = True  # false drops tensorboard from logging.backends
    progress: bool = True
    sample_every: int = bounded(10, 0)  # print sampled completions every N steps (0: only step 0)
    samples_to_print: int = bounded(2, 0)


@dataclass
class FilterConfig:
    """Why a chain of thought that reached the right answer is still not trained on (r1 sample, r1 coldstart;
    DeepSeek-R1: mixed languages, long paragraphs and code blocks are filtered out). Each check is a switch."""

    require_format: bool = True  # strict <think>…</think><answer>…</answer>
    mixed_language: bool = True  # drop chains of thought below min_language_share in rewards.language
    min_language_share: float = bounded(0.95, 0.0, 1.0)
    code_blocks: bool = True  # drop ``` fences in the reasoning
    max_paragraph_chars: int = bounded(2000, 0)  # longest paragraph of the reasoning; 0: off
    max_response_tokens: int = bounded(0, 0)  # longer responses are dropped as over-long; 0: off


@dataclass
class SampleConfig:
    """r1 sample (rejection sampling): rollout.n samples per prompt, the verified-correct ones kept."""

    out: str = "runs/sample/samples.jsonl"  # SFT-ready rows (prompt, response); stats beside it
    keep_per_prompt: int = bounded(4, 1)
    prompts_per_batch: int = bounded(16, 1)  # prompts generated (and appended) together
    # a local model folder that judges prompts without a checkable answer (data.answer_field empty or
    # absent): it reads the question and the response and says whether the final answer is right.
    # "": such prompts are an error
    judge: str = ""
    judge_max_new_tokens: int = bounded(16, 1)


@dataclass
class ColdstartConfig:
    """r1 coldstart (DeepSeek-R1 stage 1): long chains of thought in the readable format, then SFT on them."""

    out: str = "runs/coldstart/data.jsonl"  # SFT-ready rows; stats and the finished-prompt index beside it
    # a local model folder that writes the chains of thought by few-shot prompting with coldstart.exemplars;
    # "": the rows' own data.response_field (e.g. synthetic worked solutions) is post-processed and filtered
    generator: str = ""
    exemplars: str = ""  # JSONL of {prompt, response} long-CoT examples shown before each problem
    shots: int = bounded(2, 0)  # exemplars per prompt
    reflect: bool = False  # a second pass in which the generator re-checks its own answer before closing
    reflect_prompt: str = "\n\nWait, let me verify this answer step by step."
    keep_per_prompt: int = bounded(1, 1)
    prompts_per_batch: int = bounded(16, 1)
    # check final answers with the task's rule checker where the row has a ground truth (data.answer_field);
    # false keeps them unchecked, as a hand-written or noisy cold start would be (verified: none)
    verify: bool = True
    require_verified: bool = False  # drop rows without a ground-truth answer (they cannot be verified)


@dataclass
class DistillConfig:
    """r1 distill: SFT of a small dense student on teacher data, optionally with the teacher's logits."""

    student: str = ""  # the preset (configs/students/NAME.yaml) or local folder the run was resolved from
    architecture: str = ""  # what the preset expects at model.path (printed by --dry-run)
    teacher: str = ""  # a local folder with the student's tokenizer: logit distillation; "": plain SFT
    kl_weight: float = bounded(0.5, 0.0, 1.0)  # loss = (1 - w) NLL + w KL
    kl_direction: Literal["forward", "reverse"] = "forward"  # KL(teacher || student) or KL(student || teacher)
    temperature: float = bounded(1.0, 0.0, above=True)
    chunk_tokens: int = bounded(1024, 1)  # tokens per [chunk x V] logits block; [N x V] is never whole


@dataclass
class CheckpointConfig:
    every: int = bounded(0, 0)  # 0: only at the end
    keep: int = bounded(2, 0)  # newest checkpoints kept; 0: all
    stop_after: int = bounded(0, 0)  # stop the run after this many steps (to test resume); 0: off
    # a checkpoint whenever this many minutes passed since the last one (besides `every`): a killed job loses at
    # most that much; 0: off. Under SLURM, scripts/slurm/launch.sh also sets R1_STOP_AT from the job's time limit:
    # the run checkpoints and stops (exit 75, requeued) when the next step and checkpoint would not fit before it
    every_minutes: float = bounded(0.0, 0.0)
    export_hf: bool = True


@dataclass
class Config:
    # Python files or modules of the user's own rewards, task checkers, ... imported before the names are checked
    # (r1cli.plugins); a relative file is looked up beside the config file that names it, then where r1 runs
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    coldstart: ColdstartConfig = field(default_factory=ColdstartConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ---------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if origin in (list, dict):
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    bad = R1Error(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if tp is Any:  # a value handed on as it is (chat template variables)
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arm)
            except R1Error:
                pass
        raise bad
    if origin is list:
        if isinstance(value, str):  # `rollout.stop=</answer>` on the command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise R1Error(f"config key '{key}': {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None:
            raise bad
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


MOVED = {f"train.eval_{k}": f"eval.{k}" for k in ("every", "samples", "n", "temperature", "max_new_tokens")}
MOVED |= {"sample.require_format": "filters.require_format", "sample.filter_mixed_language": "filters.mixed_language",
          "sample.min_language_share": "filters.min_language_share", "sample.filter_code_blocks": "filters.code_blocks",
          "sample.max_paragraph_chars": "filters.max_paragraph_chars"}


# keys that moved into the sub-section of the part that reads them: the old name still works, with a note
RENAMED = {"parallel.data_parallel": "parallel.torch.data_parallel",
           "train.fused_linear": "parallel.torch.fused_linear",
           "parallel.sequence_parallel": "parallel.megatron.sequence_parallel",
           "parallel.distributed_optimizer": "parallel.megatron.distributed_optimizer"}
RENAMED |= {f"rollout.{k}": f"rollout.vllm.{k}" for k in ("gpu_memory_utilization", "kv_cache_gb", "tensor_parallel",
                                                          "weight_bucket_mb", "sleep_level", "max_model_len",
                                                          "enforce_eager")}
_noted: set[str] = set()


def _renamed(key: str) -> str:
    if key not in RENAMED:
        return key
    if key not in _noted:  # once per process
        _noted.add(key)
        sys.stderr.write(f"note: config key '{key}' moved to '{RENAMED[key]}'\n")
    return RENAMED[key]


def _with_new_names(values: Any) -> Any:
    """A root mapping ({section: {key: value}}) with moved keys under their new names."""
    if not isinstance(values, dict):
        return values
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for section, body in values.items():
        if not isinstance(body, dict):
            continue
        for k in body:
            new = _renamed(f"{section}.{k}")
            if new != f"{section}.{k}":
                value = out[section].pop(k)
                *path, leaf = new.split(".")
                node = out
                for p in path:
                    node = node.setdefault(p, {})
                    if not isinstance(node, dict):
                        raise R1Error(f"config section '{p}' must be a mapping, got {node!r}")
                node[leaf] = value
    return out


def _unknown_key(key: str, valid: list[str]) -> R1Error:
    if key in MOVED:
        return R1Error(f"config key '{key}' moved to '{MOVED[key]}'")
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return R1Error(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise R1Error(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, names)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v if v is not None else {}, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _set_path(obj: Any, path: str, raw: Any) -> None:
    """Apply one override; dict-valued fields (rewards.weights.x=1) merge by key."""
    parts = _renamed(path).split(".")
    node, prefix = obj, ""
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            break
        names = [f.name for f in dataclasses.fields(node)]
        if p not in names:
            raise _unknown_key(prefix + p, names)
        if i == len(parts) - 1:
            _apply(node, {p: raw}, prefix)
            return
        child = getattr(node, p)
        if isinstance(child, dict):
            rest = ".".join(parts[i + 1 :])
            merged = dict(child)
            merged[rest] = raw
            _apply(node, {p: merged}, prefix)
            return
        node, prefix = child, prefix + p + "."
    raise R1Error(f"config key '{path}' does not name a setting")


def load_config(path: str | list[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
                layers: list[dict] = ()) -> Config:
    """Defaults, then each YAML file in order (a later one wins), then `layers` (mappings), then overrides."""
    from r1cli.plugins import resolve_near

    cfg = Config()
    for p in [path] if isinstance(path, (str, Path)) else list(path or []):
        data = read_yaml(p)
        if isinstance(data.get("plugins"), list):  # a plugin file beside the config file that names it
            data["plugins"] = [resolve_near(str(e), resolve_config(p).parent) for e in data["plugins"]]
        apply_layer(cfg, data)
    for data in layers:
        apply_layer(cfg, data)
    apply_overrides(cfg, overrides)
    return checked(cfg)


def apply_layer(cfg: Config, data: dict) -> None:
    """Set the keys of a nested mapping ({section: {key: value}}), each checked like a file's."""
    _apply(cfg, _with_new_names(data))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    """`section.key=value` strings, values read as YAML."""
    for text in overrides:
        if "=" not in text:
            raise R1Error(f"override '{text}' must look like section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(cfg, key.strip(), value)


def checked(cfg: Config) -> Config:
    """Paths expanded, ranges and registry names checked: the last step of building a config."""
    from r1cli.plugins import load_plugins

    _expand_paths(cfg)
    check_ranges(cfg)
    load_plugins(cfg.plugins)  # before the names: a plugin registers its own
    check_registered(cfg)
    check_model_rewards(cfg)
    check_lora(cfg)
    check_owned(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a syntax error names file:line:column."""
    p = resolve_config(path)
    if not p.is_file():
        raise R1Error(f"config file not found: {path} (shipped configs: `r1 configs`)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise R1Error(f"{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise R1Error(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def _leaves(obj: Any, prefix: str = ""):
    """(key, field, value) for every setting of a config tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def check_ranges(cfg: Any) -> None:
    """Every bounded number lies in its range (declared with the field)."""
    for key, f, value in _leaves(cfg):
        if isinstance(value, str):  # a number's named alternative (train.max_tokens_per_micro_batch: auto)
            continue
        low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
        if low is not None and (value <= low if above else value < low):
            raise R1Error(f"config key '{key}': {value!r} is out of range (must be {'>' if above else '>='} {low})")
        if high is not None and value > high:
            raise R1Error(f"config key '{key}': {value!r} is out of range (must be <= {high})")


def _setting(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_owned(cfg: Any) -> None:
    """A sub-section read by one backend or engine (owned(...)) is refused when set for another: silently
    ignoring it is the bug users spend days on."""
    _check_owned(cfg, cfg, "")


def _check_owned(obj: Any, root: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        key = f"{prefix}{f.name}"
        if "owner" in f.metadata:
            owner, readers = f.metadata["owner"]
            chosen = _setting(root, owner)
            if chosen not in readers:
                default = f.default_factory()
                changed = [g.name for g in dataclasses.fields(value)
                           if getattr(value, g.name) != getattr(default, g.name)]
                if changed:
                    reader = "|".join(r for r in readers if r != "auto")
                    raise R1Error(f"config key '{key}.{changed[0]}' is read only with {owner}={reader}; this run "
                                  f"has {owner}={chosen} (drop the key, or set {owner}={reader})")
        _check_owned(value, root, key + ".")


def check_model_rewards(cfg: Config) -> None:
    """A model reward with a weight needs its model; rewards.model is read by the reward_model reward only, so
    setting it without that weight is refused (rewards.judge also serves r1 sample and r1 eval)."""
    for name, section in (("reward_model", "model"), ("judge", "judge")):
        used, path = name in cfg.rewards.weights, getattr(cfg.rewards, section).path
        if used and not path:
            raise R1Error(f"rewards.weights.{name} needs rewards.{section}.path (a local model folder)")
    if "reward_model" not in cfg.rewards.weights and cfg.rewards.model != RewardModelConfig():
        raise R1Error("rewards.model is read only by the reward_model reward; this run has no "
                      "rewards.weights.reward_model (give it a weight, or drop rewards.model)")


def check_lora(cfg: Config) -> None:
    """model.lora runs on the torch backend, with the base model as the fixed reference."""
    if not cfg.model.lora.rank:
        return
    if cfg.parallel.backend == "megatron":
        raise R1Error("model.lora runs on the torch backend (peft adapters on transformers models); "
                      "parallel.backend=megatron does not take it: set parallel.backend=torch or model.lora.rank=0")
    outside = sorted({"lm_head", "embed_tokens"} & set(cfg.model.lora.target_modules))
    if outside:  # the fused losses read lm_head's weight directly: an adapter there would be silently left out
        raise R1Error(f"model.lora.target_modules: {', '.join(outside)} cannot take adapters (the loss reads the "
                      "output layer's weight itself); adapt the decoder's projections (the default, or all-linear)")
    if cfg.grpo.ref_update_every:
        raise R1Error("model.lora: the reference is the base model (the adapters switched off), which does not "
                      "follow the policy: grpo.ref_update_every must be 0")


def check_generate_only(cfg: Config, command: str) -> None:
    """What a command that only generates (r1 sample, r1 eval) would ignore: generating ahead of a trainer."""
    r = cfg.rollout
    for key, on in (("rollout.asynchronous", r.asynchronous), ("rollout.max_staleness", r.max_staleness),
                    ("rollout.partial", r.partial)):
        if on:
            raise R1Error(f"{key} overlaps r1 rl's generation with its training; r1 {command} only generates: "
                          "drop it")


def check_registered(cfg: Any) -> None:
    """Every registry-backed key names a registered entry (dict keys for dict fields)."""
    import importlib

    for key, f, value in _leaves(cfg):
        if "registry" in f.metadata:
            module, attr = f.metadata["registry"].split(":")
            registry = getattr(importlib.import_module(module), attr)
            for name in value if isinstance(value, (dict, list)) else [value]:
                registry.check(name, key)


PATH_KEYS = ("model.path", "data.train", "data.eval", "data.chat_template", "train.output_dir", "sample.out",
             "sample.judge", "benchmark.out", "benchmark.data_dir", "benchmark.completions", "coldstart.out",
             "coldstart.generator", "coldstart.exemplars", "distill.teacher", "rewards.model.path",
             "rewards.judge.path", "rewards.judge.template")


def _expand_paths(cfg: Config) -> None:
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        obj = functools.reduce(getattr, sections, cfg)
        value = getattr(obj, name)
        if value:  # ${R1_MODELS} (the presets' model folder) defaults to ./models
            value = value.replace("${R1_MODELS}", os.environ.get("R1_MODELS", "models"))
            setattr(obj, name, os.path.expandvars(os.path.expanduser(value)))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, directory: str | Path) -> Path:
    out = Path(directory) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, out)
    return out
