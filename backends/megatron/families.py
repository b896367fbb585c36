"""Model families as data: which megatron-core layer options a Hugging Face architecture needs, and how its
weights are named on both sides. A new family is one registered `Family`, not a branch in the converter.

Megatron names follow megatron-core's local GPT layer spec (the TE spec fuses each norm into the next
linear layer: `linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`; `te_name` maps them).
"""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.errors import R1Error
from r1cli.registry import Registry


@dataclass(frozen=True)
class Family:
    qkv_bias: bool = False  # Qwen2: biases on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k

    # per-layer HF names (prefix model.layers.{i}.)
    q = "self_attn.q_proj"
    k = "self_attn.k_proj"
    v = "self_attn.v_proj"
    o = "self_attn.o_proj.weight"
    q_norm = "self_attn.q_norm.weight"
    k_norm = "self_attn.k_norm.weight"
    gate = "mlp.gate_proj.weight"
    up = "mlp.up_proj.weight"
    down = "mlp.down_proj.weight"
    attn_norm = "input_layernorm.weight"
    mlp_norm = "post_attention_layernorm.weight"
    embed = "model.embed_tokens.weight"
    final_norm = "model.norm.weight"
    lm_head = "lm_head.weight"


# Megatron's local-spec names (prefix decoder.layers.{i}.) for the same weights
MEGATRON = dict(
    qkv="self_attention.linear_qkv", proj="self_attention.linear_proj.weight",
    q_norm="self_attention.q_layernorm.weight", k_norm="self_attention.k_layernorm.weight",
    fc1="mlp.linear_fc1.weight", fc2="mlp.linear_fc2.weight",
    attn_norm="input_layernorm.weight", mlp_norm="pre_mlp_layernorm.weight",
    embed="embedding.word_embeddings.weight", final_norm="decoder.final_layernorm.weight",
    output="output_layer.weight",
)

FAMILIES = Registry("model family")  # keyed by config.json's model_type
FAMILIES.register("llama", Family())
FAMILIES.register("mistral", Family())
FAMILIES.register("qwen2", Family(qkv_bias=True))
FAMILIES.register("qwen3", Family(qk_norm=True))


@dataclass(frozen=True)
class Shape:
    """What the converter needs from an HF config.json."""

    family: Family
    model_type: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        family = FAMILIES.get(cfg.get("model_type", "?"), "config.json model_type")
        heads = cfg["num_attention_heads"]
        return cls(family, cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                   heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 x TP so that every TP shard is equal and aligned."""
    step = multiple * tp
    return -(-vocab // step) * step


def check_layout(shape: Shape, tp: int, pp: int, world: int | None = None) -> None:
    """An impossible TP x PP layout is one line, before any model or weight is touched."""
    problems = []
    if shape.heads % tp:
        problems.append(f"{shape.heads} attention heads are not divisible by tensor_parallel={tp}")
    if shape.kv_heads % tp:
        problems.append(f"{shape.kv_heads} key/value heads are not divisible by tensor_parallel={tp}")
    if shape.ffn % tp:
        problems.append(f"intermediate size {shape.ffn} is not divisible by tensor_parallel={tp}")
    if shape.layers % pp:
        problems.append(f"{shape.layers} layers are not divisible by pipeline_parallel={pp}")
    if world is not None and world % (tp * pp):
        problems.append(f"{world} processes are not divisible by tensor_parallel x pipeline_parallel = {tp * pp}")
    if problems:
        raise R1Error("impossible parallel layout: " + "; ".join(problems))


# the Transformer Engine spec fuses the two per-layer norms into the linear layer after them
_TE_FUSED = {MEGATRON["attn_norm"]: "self_attention.linear_qkv.layer_norm_weight",
             MEGATRON["mlp_norm"]: "mlp.linear_fc1.layer_norm_weight"}


def te_name(name: str) -> str:
    """A local-spec megatron name as the Transformer Engine spec's model calls it."""
    for local, te in _TE_FUSED.items():
        if name.endswith("." + local):
            return name[: -len(local)] + te
    return name
