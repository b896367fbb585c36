"""Per-GPU memory of a run, counted before anything is loaded: the model is built on the meta device from its
config.json (no weights read, no GPU), and each resident piece is sized as the torch backend holds it today.

Rows: parameters, gradients and AdamW state (fp32 masters under model.dtype auto / bf16-mixed; divided over the
data-parallel ranks under FSDP), the reference model (grpo.beta > 0: in the compute dtype, bf16 on a GPU under
auto, and sharded like the policy), the rollout engine's weights
(a transformers engine shares the policy unless FSDP shards it, then keeps its own copy in the compute dtype; vLLM
keeps a bf16 copy split over its TP ranks) and
its KV cache, and an activation estimate (Korthikanti et al. 2022: 34·s·b·h bytes per layer in 16-bit, the
attention scores left to flash attention; with gradient checkpointing only each layer's input is kept, plus one
layer's working set). The first five are exact for what they count (tests/e2e/test_memory_plan.py holds them to
a live trainer's tensors); the activations are an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1cli.config import Config
from r1cli.errors import R1Error

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


def model_size(path: str) -> ModelSize:
    """Parameter count and shape of the model at `path` from its config.json alone (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise R1Error(f"{path}: no config.json; the memory plan needs the model's config.json (its weights are not "
                      "read)")
    c = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    heads = c.num_attention_heads
    return ModelSize(sum(p.numel() for p in model.parameters()), c.num_hidden_layers, c.hidden_size, heads,
                     getattr(c, "num_key_value_heads", None) or heads,
                     getattr(c, "head_dim", None) or c.hidden_size // heads, c.vocab_size)


def _param_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4  # auto and bf16-mixed keep fp32 masters


def plan(cfg: Config, command: str, gpus: int, size: ModelSize | None = None, device: str = "cuda",
         gpu_bytes: int = 80 * GB) -> list[tuple[str, int]]:
    """(piece, bytes on each `device`) for `r1 <command>` on `gpus` data-parallel ranks with the torch backend;
    `gpu_bytes` sizes vLLM's KV cache when it fills its memory share."""
    import torch

    from r1cli.models.loading import frozen_dtype

    if cfg.parallel.backend != "torch":
        raise R1Error(f"the memory plan counts parallel.backend=torch; {cfg.parallel.backend} is not counted yet")
    m = size or model_size(cfg.model.path)
    pb = _param_bytes(cfg.model.dtype)
    shard = gpus if gpus > 1 and cfg.parallel.torch.data_parallel == "fsdp" else 1
    rows = [("parameters", m.params * pb // shard), ("gradients", m.params * pb // shard),
            ("AdamW state", 2 * m.params * pb // shard)]
    rl = command == "rl"
    if rl and cfg.grpo.beta > 0:  # frozen in the compute dtype, sharded like the policy
        rows.append(("reference model", m.params * _param_bytes(frozen_dtype(cfg.model.dtype, torch.device(device)))
                     // shard))
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
            rows.append(("engine weights", m.params * frozen if shard > 1 else 0))  # shares the policy unless sharded
            batch = (r.prompts_per_generate or 8) * r.n
            rows.append(("engine KV cache", batch * seq * kv_token * pb))
    else:
        seq = cfg.data.max_seq_len
    b, h = cfg.train.micro_batch_size, m.hidden
    per_layer = 34 * seq * b * h  # bytes in 16-bit compute (Korthikanti et al.), flash attention
    kept = m.layers * seq * b * h * 2 + per_layer if cfg.model.gradient_checkpointing else m.layers * per_layer
    rows.append(("activations (estimate)", kept + seq * b * h * 4))  # + the final hidden states for the fused loss
    return rows


def render(rows: list[tuple[str, int]], gpu_gb: float, gpus: int, command: str) -> tuple[str, bool]:
    total = sum(v for _, v in rows)
    fits = total <= gpu_gb * GB
    lines = [f"memory per GPU for r1 {command} on {gpus} GPU{'s' if gpus > 1 else ''} of {gpu_gb:g} GB "
             "(torch backend; counted from config.json on the meta device)"]
    lines += [f"  {k:24s} {v / GB:9.2f} GB" for k, v in rows]
    lines.append(f"  {'total':24s} {total / GB:9.2f} GB  {'fits' if fits else 'DOES NOT FIT'}")
    return "\n".join(lines), fits
