"""parallel: the backend (torch or megatron) and how the model is split over devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1cli.config.fields import bounded, named, owned


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
    pipeline_parallel: int = bounded(1, 1)  # Megatron: pipeline stages the layers are split over
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
