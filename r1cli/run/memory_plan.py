"""Per-GPU memory of a run, counted before anything is loaded: the model is built on the meta device from its
config.json (no weights read, no GPU), and each resident piece is sized as the torch backend holds it today.

Rows: parameters, gradients and AdamW state (fp32 masters under model.dtype auto / bf16-mixed; divided over the
data-parallel ranks under FSDP; under model.lora a frozen base in the compute dtype plus fp32 adapters, which alone
have gradients and AdamW state, and no reference copy), the reference model (grpo.beta > 0: in the compute dtype,
bf16 on a GPU under auto, and sharded like the policy), PPO's critic (grpo.advantage=gae: parameters, gradients and
AdamW state of the model at critic.path with a [1 x hidden] value head), the rollout engine's weights
(a transformers engine shares the policy unless FSDP shards it, then keeps its own copy in the compute dtype; vLLM
keeps a bf16 copy split over its TP ranks) and
its KV cache, and the activation peak of a micro-batch (activation_bytes: counted from the decoder's shapes). The
resident rows are exact for what they count (tests/e2e/test_memory_plan.py holds them to a live trainer's tensors);
the activations are an estimate, held there to torch's MemTracker peak on the CPU within a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from r1cli.config import Config, LoraConfig
from r1cli.errors import R1Error

if TYPE_CHECKING:
    import torch

GB = 1 << 30


@dataclass(frozen=True)
class ModelSize:
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int


def model_size(path: str) -> ModelSize:
    """Parameter count and shape of the model at `path` from its config.json alone (built on the meta device)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise R1Error(f"{path}: no config.json; the memory plan needs the model's config.json (its weights are not "
                      "read)")
    return size_of_config(AutoConfig.from_pretrained(path, local_files_only=True))


def size_of_config(c) -> ModelSize:
    """ModelSize of a transformers config (the model built on the meta device: an exact parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    heads = c.num_attention_heads
    return ModelSize(sum(p.numel() for p in model.parameters()), c.num_hidden_layers, c.hidden_size, heads,
                     getattr(c, "num_key_value_heads", None) or heads,
                     getattr(c, "head_dim", None) or c.hidden_size // heads, c.vocab_size, c.intermediate_size)


def critic_parameters(path: str) -> int:
    """Parameters of a critic built from the model at `path`: the model with its lm_head replaced by a [1 x hidden]
    value head (r1cli.models.value_head), counted on the meta device from config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1cli.models.value_head import to_value_head

    if not (Path(path) / "config.json").is_file():
        raise R1Error(f"{path}: no config.json; the memory plan needs the critic's config.json (critic.path)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    to_value_head(model)
    return sum(p.numel() for p in model.parameters())


def _param_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4  # auto and bf16-mixed keep fp32 masters


def plan(cfg: Config, command: str, gpus: int, size: ModelSize | None = None, device: str = "cuda",
         gpu_bytes: int = 80 * GB, teacher: ModelSize | None = None) -> list[tuple[str, int]]:
    """(piece, bytes on each `device`) for `r1 <command>` (rl, sft, distill) on `gpus` data-parallel ranks with the
    torch backend; `gpu_bytes` sizes vLLM's KV cache when it fills its memory share; `teacher`: distillation's."""
    import torch

    from r1cli.models.loading import frozen_dtype

    if cfg.parallel.backend != "torch":
        raise R1Error(f"the memory plan counts parallel.backend=torch; {cfg.parallel.backend} is not counted yet")
    m = size or model_size(cfg.model.path)
    pb = _param_bytes(cfg.model.dtype)
    shard = gpus if gpus > 1 and cfg.parallel.torch.data_parallel == "fsdp" else 1
    adapters = lora_parameters(m, cfg.model.lora) if cfg.model.lora.rank else 0
    if adapters:  # a frozen base in the compute dtype; only the fp32 adapters have gradients and AdamW state
        base = m.params * _param_bytes(frozen_dtype(cfg.model.dtype, torch.device(device)))
        rows = [("parameters", (base + 4 * adapters) // shard), ("gradients", 4 * adapters // shard),
                ("AdamW state", 8 * adapters // shard)]
    else:
        rows = [("parameters", m.params * pb // shard), ("gradients", m.params * pb // shard),
                ("AdamW state", 2 * m.params * pb // shard)]
    rl = command == "rl"
    if teacher is not None:  # frozen like the reference: the compute dtype, sharded like the student
        rows.append(("teacher model", teacher.params * _param_bytes(frozen_dtype(cfg.model.dtype,
                                                                                  torch.device(device))) // shard))
    if rl and cfg.grpo.beta > 0 and adapters:  # the policy with its adapters off
        rows.append(("reference model (no copy)", 0))
    elif rl and cfg.grpo.beta > 0:  # frozen in the compute dtype, sharded like the policy
        rows.append(("reference model", m.params * _param_bytes(frozen_dtype(cfg.model.dtype, torch.device(device)))
                     // shard))
    if rl and cfg.grpo.advantage == "gae":  # PPO's critic: trained in full beside the policy, sharded like it
        critic = critic_parameters(cfg.critic.path or cfg.model.path)
        rows += [("critic parameters", critic * pb // shard), ("critic gradients", critic * pb // shard),
                 ("critic AdamW state", 2 * critic * pb // shard)]
    if rl:
        r = cfg.rollout
        seq = cfg.data.max_prompt_tokens or 1024
        seq += r.max_new_tokens
        kv_token = 2 * m.layers * m.kv_heads * m.head_dim  # K and V, every layer
        if r.engine in ("vllm", "auto"):  # what auto picks on a GPU
            tp = r.vllm.tensor_parallel
            weights = m.params * 2 // tp
            rows.append(("vLLM weights (bf16)", weights))
            # an explicit size, or what its share of the GPU leaves after its weights
            kv = int(r.vllm.kv_cache_gb * GB) if r.vllm.kv_cache_gb else \
                max(0, int(r.vllm.gpu_memory_utilization * gpu_bytes) - weights)
            rows.append(("vLLM KV cache", kv))
        else:
            frozen = _param_bytes(frozen_dtype(cfg.model.dtype, torch.device(device)))
            # shares the policy unless sharded or generating beside the trainer (rollout.asynchronous)
            rows.append(("engine weights", m.params * frozen if shard > 1 or r.asynchronous else 0))
            tokens = r.tokens_per_generate or (r.prompts_per_generate or 8) * r.n * seq
            rows.append(("engine KV cache", tokens * kv_token * pb))
    else:
        seq = cfg.data.max_seq_len
    low = low_weights(cfg, gpus)
    budget = cfg.train.max_tokens_per_micro_batch
    if budget == "auto":  # the largest the device holds after the resident rows
        budget = token_budget(cfg, m, torch.device(device), gpu_bytes - sum(v for _, v in rows), low)
    tokens = budget or cfg.train.micro_batch_size * seq
    rows.append(("activations (estimate)", activation_bytes(cfg, m, tokens, torch.device(device), low_weights=low)))
    return rows


def low_weights(cfg: Config, gpus: int) -> bool:
    """Whether the layers compute with 16-bit weights under mixed precision (so every activation is 16-bit): FSDP's
    mixed-precision policy hands them bf16 parameters, and a LoRA run's frozen base is bf16."""
    return (gpus > 1 and cfg.parallel.torch.data_parallel == "fsdp") or bool(cfg.model.lora.rank)


def long_answer_table(cfg: Config, gpus: int, size: ModelSize | None = None, device: str = "cuda", **_):
    """long_answer_rows for `r1 <command> --dry-run`: the model at model.path (or `size`) on `gpus` GPUs."""
    import torch

    return long_answer_rows(cfg, size or model_size(cfg.model.path), torch.device(device), low_weights(cfg, gpus))


def lora_parameters(m: ModelSize, cfg: LoraConfig) -> int:
    """The adapters' parameter count: rank x (inputs + outputs) of each target projection of each adapted layer."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    shapes = {"q_proj": (m.hidden, q), "k_proj": (m.hidden, kv), "v_proj": (m.hidden, kv), "o_proj": (q, m.hidden),
              "gate_proj": (m.hidden, m.intermediate), "up_proj": (m.hidden, m.intermediate),
              "down_proj": (m.intermediate, m.hidden)}
    targets = list(shapes) if cfg.target_modules == ["all-linear"] else cfg.target_modules
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise R1Error(f"the memory plan counts LoRA on {', '.join(shapes)} (or all-linear); model.lora.target_modules "
                      f"has {', '.join(unknown)}")
    layers = len(set(cfg.layers)) if cfg.layers else m.layers
    return layers * cfg.rank * sum(sum(shapes[t]) for t in set(targets))


def activation_bytes(cfg: Config, m: ModelSize, tokens: int, device: torch.device, low_weights: bool = False,
                     cp: int | None = None, checkpointing: bool | None = None) -> int:
    """The activation peak on one rank of one micro-batch of `tokens` tokens (forward and backward), counted from the
    decoder's shapes: each layer keeps, per token, its two norms' inputs and outputs, q / k / v, the attention output
    (flash attention: no [s x s] scores; torch's CPU attention does the same) and the SwiGLU MLP's gate, up,
    activation and product - 6h + 2·kv_heads·head_dim + 4·intermediate values in the compute dtype; with gradient
    checkpointing only each layer's input is kept. On top: the loss's working set (the fused Triton kernels: fp32
    d(hidden) and one logits chunk; the torch reference: fp32 logits and their log-softmax) and one layer's backward
    working set. With low_weights (FSDP's mixed-precision policy hands the layers bf16 parameters; LoRA's frozen base
    is bf16) everything is 16-bit (no fp32 residual stream). Under context parallelism over `cp` ranks (default:
    parallel.context_parallel) a rank holds tokens / cp of everything, plus one layer's query, key, value and output
    in the other layout (the all-to-all's buffers). Checked against torch's MemTracker on the CPU
    (tests/e2e/test_memory_plan.py)."""
    from r1cli.kernels.fused_linear import LOGITS_BUDGET_BYTES
    from r1cli.models.loading import compute_dtype

    cp = cfg.parallel.context_parallel if cp is None else cp
    checkpointing = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    low = compute_dtype(cfg.model.dtype, device) is not None
    mixed = low and not low_weights  # bf16 autocast over fp32 parameters
    c = 2 if low or _param_bytes(cfg.model.dtype) == 2 else 4
    tokens = -(-tokens // cp)  # this rank's
    qkv_mlp = 2 * m.kv_heads * m.head_dim + 4 * m.intermediate
    if mixed:  # the residual stream and the norms stay fp32; each norm's output is cast to bf16 for its matmuls
        per_layer = tokens * (4 * m.hidden * 4 + (4 * m.hidden + qkv_mlp) * 2)
    else:
        per_layer = tokens * (6 * m.hidden + qkv_mlp) * c
    kept = m.layers * tokens * m.hidden * (4 if mixed else c) if checkpointing else m.layers * per_layer
    triton = device.type == "cuda" and cfg.train.kernels != "torch"
    if triton:
        loss = tokens * m.hidden * 4 + LOGITS_BUDGET_BYTES
    else:  # the logits (in the compute dtype, then fp32) and their fp32 log-softmax
        loss = tokens * m.vocab * (8 + (2 if c == 2 else 0))
    exchange = tokens * 2 * (m.heads + m.kv_heads) * m.head_dim * c if cp > 1 else 0
    return kept + loss + per_layer + exchange


def token_budget(cfg: Config, m: ModelSize, device: torch.device, free: int, low_weights: bool = False,
                 headroom: float = 0.85) -> int:
    """train.max_tokens_per_micro_batch=auto: the most tokens of one micro-batch (over its context-parallel ranks)
    whose activation estimate fits `headroom` of the `free` bytes, in steps of 256 (at least 256). The estimate is
    affine in the tokens (a constant working set plus bytes per token), so this is one division."""
    span = 1 << 14
    fixed = activation_bytes(cfg, m, 0, device, low_weights)
    per_token = (activation_bytes(cfg, m, span, device, low_weights) - fixed) / span
    tokens = int((headroom * free - fixed) / per_token)
    return max(256, tokens // 256 * 256)


# rows of the plan that are not held while the trainer runs: vLLM sleeps (its KV cache freed, its weights freed or
# in host memory), a transformers engine's KV cache lives only during generate
NOT_HELD_WHILE_TRAINING = ("vLLM weights (bf16)", "vLLM KV cache", "engine KV cache")


def auto_token_budget(cfg: Config, command: str) -> tuple[int, str]:
    """train.max_tokens_per_micro_batch=auto on this machine: the budget and the line that says how it was found.
    The capacity is a GPU's memory (the CPU's available memory, shared by the processes on it) less the plan's rows
    held while the trainer runs."""
    import os

    import torch

    from r1cli.models.loading import resolve_device

    if cfg.parallel.backend != "torch":
        raise R1Error("train.max_tokens_per_micro_batch=auto reads the memory plan, which counts parallel.backend="
                      f"torch; {cfg.parallel.backend} is not counted yet: give the budget in tokens")
    device = resolve_device(cfg.train.device)
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        where = f"a GPU of {capacity / GB:.1f} GB"
    else:
        capacity = available_bytes(device) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        where = f"{capacity / GB:.1f} GB of the CPU's available memory per process"
    teacher = model_size(cfg.distill.teacher) if command == "distill" and cfg.distill.teacher else None
    rows = plan(cfg, command, gpus, device=device.type, gpu_bytes=capacity, teacher=teacher)
    held = sum(v for k, v in rows if not k.startswith("activations") and k not in NOT_HELD_WHILE_TRAINING)
    m = model_size(cfg.model.path)
    budget = token_budget(cfg, m, device, capacity - held, low_weights(cfg, gpus))
    cp = cfg.parallel.context_parallel
    note = (f"train.max_tokens_per_micro_batch=auto: {budget} tokens per micro-batch"
            f"{f' ({budget // cp} per rank of context_parallel={cp})' if cp > 1 else ''} - the memory plan's "
            f"activation estimate within 85% of what {where} leaves after {held / GB:.2f} GB of resident state")
    return budget, note


LONG_ANSWERS = (8192, 16384, 32768)


def long_answer_rows(cfg: Config, m: ModelSize, device: torch.device, low_weights: bool = False,
                     cps: tuple[int, ...] = (1, 2, 4, 8)) -> list[tuple[int, int, bool, int]]:
    """(tokens, context-parallel ranks, checkpointing, activation bytes per rank) of one micro-batch holding one
    answer of 8k, 16k and 32k tokens: what decides whether a long answer fits, and what each choice buys."""
    return [(n, cp, ck, activation_bytes(cfg, m, n, device, low_weights, cp=cp, checkpointing=ck))
            for n in LONG_ANSWERS for ck in (False, True) for cp in cps if m.heads >= cp]


def check_fits(cfg: Config, command: str, gpus: int, gpu_bytes: int) -> str | None:
    """Before a GPU run loads anything: refuse when what the plan counts exactly (all but the activations) exceeds
    a GPU; a warning line when the activation estimate takes it over; None when it fits."""
    teacher = model_size(cfg.distill.teacher) if command == "distill" and cfg.distill.teacher else None
    rows = plan(cfg, command, gpus, gpu_bytes=gpu_bytes, teacher=teacher)
    resident = sum(v for k, v in rows if not k.startswith("activations"))
    total = sum(v for _, v in rows)
    where = f"{gpus} GPU{'s' if gpus > 1 else ''} of {gpu_bytes / GB:.0f} GB"
    if resident > gpu_bytes:
        raise R1Error(f"this config needs {resident / GB:.1f} GB per GPU before any activation on {where} "
                      f"(`r1 {command} --dry-run --gpus {gpus} --gpu-gb {gpu_bytes / GB:.0f}` prints the plan)")
    if total > gpu_bytes:
        return (f"warning: the memory plan estimates {total / GB:.1f} GB per GPU on {where} (activations "
                f"{(total - resident) / GB:.1f} GB); lower train.micro_batch_size or turn on "
                "model.gradient_checkpointing if the run runs out of memory")
    return None


def check_gpu_fits(cfg: Config, command: str) -> None:
    """check_fits for the GPUs this process sees (torch backend on CUDA only; rank 0 speaks)."""
    import os
    import sys

    import torch

    from r1cli.models.loading import resolve_device

    if cfg.parallel.backend != "torch" or resolve_device(cfg.train.device).type != "cuda":
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    note = check_fits(cfg, command, gpus, torch.cuda.get_device_properties(0).total_memory)
    if note and os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr)


def render(rows: list[tuple[str, int]], gpu_gb: float, gpus: int, command: str,
           long: list[tuple[int, int, bool, int]] = ()) -> tuple[str, bool]:
    total = sum(v for _, v in rows)
    fits = total <= gpu_gb * GB
    lines = [f"memory per GPU for r1 {command} on {gpus} GPU{'s' if gpus > 1 else ''} of {gpu_gb:g} GB "
             "(torch backend; counted from config.json on the meta device)"]
    lines += [f"  {k:24s} {v / GB:9.2f} GB" for k, v in rows]
    lines.append(f"  {'total':24s} {total / GB:9.2f} GB  {'fits' if fits else 'DOES NOT FIT'}")
    if long:
        cps = sorted({cp for _, cp, _, _ in long})
        lines.append("activations per GPU of one long answer (estimate, GB), by parallel.context_parallel:")
        lines.append(f"  {'tokens':>8s} {'checkpointing':>14s}" + "".join(f" {'CP=' + str(c):>8s}" for c in cps))
        for n in sorted({n for n, *_ in long}):
            for ck in (False, True):
                by = {cp: v for m, cp, k, v in long if m == n and k == ck}
                lines.append(f"  {n:>8d} {'on' if ck else 'off':>14s}" +
                             "".join(f" {by[c] / GB:8.2f}" if c in by else f" {'-':>8s}" for c in cps))
    return "\n".join(lines), fits


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors now: on a GPU what the driver has free plus what torch's caching allocator holds
    without using it (after a training step it keeps the freed activations cached: the next tensors reuse that), or
    the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_generation_fits(c, prompts: int, n: int, tokens: int, elem_bytes: int, device: torch.device) -> None:
    """Before a generate call: its KV cache alone (prompts x n sequences of up to `tokens`) must fit the memory
    free on `device`, or the call is refused naming the sizes, instead of an allocation traceback."""
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    need = 2 * c.num_hidden_layers * kv_heads * head_dim * elem_bytes * tokens * prompts * n
    free = available_bytes(device)
    if need > free:
        raise R1Error(f"generating {prompts} prompt{'s' if prompts > 1 else ''} x {n} samples of up to {tokens} "
                      f"tokens at once needs {need / GB:.3g} GB for the KV cache alone, and {free / GB:.3g} GB is "
                      f"free on {device}: lower the samples per prompt (rollout.n; r1 eval --samples), "
                      "rollout.prompts_per_generate (or rollout.tokens_per_generate) or the new tokens")
