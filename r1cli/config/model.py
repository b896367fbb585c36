"""model: what to load, and its LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1cli.config.fields import bounded


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the torch backend: the base weights stay frozen (in the compute dtype), only the
    adapters train, the reference policy is the base with the adapters switched off, checkpoints hold the adapters."""

    rank: int = bounded(0, 0)  # 0: off (full fine-tuning)
    alpha: float = bounded(16.0, 0.0, above=True)  # the update is (alpha / rank) B A (alpha / sqrt(rank) with rslora)
    dropout: float = bounded(0.0, 0.0, 1.0)  # LoRA dropout on the adapters' input
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
    attn_implementation: str = "sdpa"  # transformers' attention kernel (sdpa, eager, flash_attention_2, ...)
    # recompute each layer's activations in the backward (torch backend): less memory, more time
    gradient_checkpointing: bool = False
    # fp8 (parallel.backend=megatron, Transformer Engine, Hopper-class GPU): the linear layers compute in FP8
    # (E4M3 forward, E5M2 gradients) over bf16 weights with fp32 master copies
    precision: Literal["auto", "fp8"] = "auto"
    fp8_recipe: Literal["delayed", "current"] = "delayed"  # scaling from an amax history, or from this tensor
    # MoE routing replay (R3; torch backend, transformers engine, softmax top-k routers): record keeps the experts the
    # engine routed each token to and its log-probs from generation, and logs moe/routing_agreement (the share the
    # trainer routes alike); replay also routes the trainer's forwards through the recorded experts
    routing_replay: Literal["off", "record", "replay"] = "off"
    lora: LoraConfig = field(default_factory=LoraConfig)
