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
    # mixtures of experts: the router, and expert {e}'s SwiGLU (per-layer HF names)
    router = "mlp.gate.weight"
    expert_gate = "mlp.experts.{e}.gate_proj.weight"
    expert_up = "mlp.experts.{e}.up_proj.weight"
    expert_down = "mlp.experts.{e}.down_proj.weight"


@dataclass(frozen=True)
class Mixtral(Family):
    router = "block_sparse_moe.gate.weight"
    expert_gate = "block_sparse_moe.experts.{e}.w1.weight"
    expert_up = "block_sparse_moe.experts.{e}.w3.weight"
    expert_down = "block_sparse_moe.experts.{e}.w2.weight"


# Megatron's local-spec names (prefix decoder.layers.{i}.) for the same weights
MEGATRON = dict(
    qkv="self_attention.linear_qkv", proj="self_attention.linear_proj.weight",
    q_norm="self_attention.q_layernorm.weight", k_norm="self_attention.k_layernorm.weight",
    fc1="mlp.linear_fc1.weight", fc2="mlp.linear_fc2.weight", router="mlp.router.weight",
    expert_fc1="mlp.experts.local_experts.{j}.linear_fc1.weight",
    expert_fc2="mlp.experts.local_experts.{j}.linear_fc2.weight",
    attn_norm="input_layernorm.weight", mlp_norm="pre_mlp_layernorm.weight",
    embed="embedding.word_embeddings.weight", final_norm="decoder.final_layernorm.weight",
    output="output_layer.weight",
)

FAMILIES = Registry("model family")  # keyed by config.json's model_type
FAMILIES.register("llama", Family())
FAMILIES.register("mistral", Family())
FAMILIES.register("qwen2", Family(qkv_bias=True))
FAMILIES.register("qwen3", Family(qk_norm=True))
FAMILIES.register("qwen3_moe", Family(qk_norm=True))
FAMILIES.register("mixtral", Mixtral())


# families transformers trains (parallel.backend=torch) that the megatron backend does not express yet
NOT_YET = {"deepseek_v3": "deepseek_v3 on the megatron backend is not built yet (multi-head latent attention with "
                          "its interleaved RoPE, shared experts, sigmoid routing with an expert bias and group-limited "
                          "top-k); parallel.backend=torch trains it through transformers' own modules"}


@dataclass(frozen=True)
class Experts:
    """A mixture of experts as an HF config describes it (what megatron-core's MoE layer is told)."""

    count: int  # routed experts
    topk: int
    ffn: int  # each expert's hidden size
    renormalize: bool  # softmax over the top-k logits (top-k weights sum to 1) vs top-k of the full softmax
    aux_coef: float
    moe_layers: tuple[bool, ...]  # per layer: experts (True) or a dense MLP

    @classmethod
    def from_hf(cls, cfg: dict) -> "Experts | None":
        kind, layers = cfg.get("model_type"), cfg["num_hidden_layers"]
        if kind == "qwen3_moe":
            step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
            count = cfg.get("num_experts") or cfg.get("num_local_experts")
            return cls(count, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                       bool(cfg.get("norm_topk_prob", False)), float(cfg.get("router_aux_loss_coef", 0.0)),
                       tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)))
        if kind == "mixtral":
            return cls(cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"], True,
                       float(cfg.get("router_aux_loss_coef", 0.0)), (True,) * layers)
        return None


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
    experts: Experts | None = None  # a mixture of experts

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        if cfg.get("model_type") in NOT_YET:
            raise R1Error(NOT_YET[cfg["model_type"]])
        family = FAMILIES.get(cfg.get("model_type", "?"), "config.json model_type")
        heads = cfg["num_attention_heads"]
        return cls(family, cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                   heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)), Experts.from_hf(cfg))

    def is_moe(self, layer: int) -> bool:
        return self.experts is not None and self.experts.moe_layers[layer]


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 x TP so that every TP shard is equal and aligned."""
    step = multiple * tp
    return -(-vocab // step) * step


def check_layout(shape: Shape, tp: int, pp: int, world: int | None = None, ep: int = 1) -> None:
    """An impossible TP x PP (x EP) layout is one line, before any model or weight is touched."""
    problems = []
    if ep > 1 and shape.experts is None:
        problems.append(f"expert_parallel={ep} needs a mixture of experts; {shape.model_type} has none")
    if shape.experts is not None:
        if shape.experts.count % ep:
            problems.append(f"{shape.experts.count} experts are not divisible by expert_parallel={ep}")
        if shape.experts.ffn % tp:
            problems.append(f"expert hidden size {shape.experts.ffn} is not divisible by tensor_parallel={tp}")
        if world is not None and (world // max(1, tp * pp)) % ep:
            problems.append(f"expert_parallel={ep} must divide the data-parallel size {world // max(1, tp * pp)}")
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
