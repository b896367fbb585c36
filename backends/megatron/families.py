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
    latent: bool = False  # DeepSeek: multi-head latent attention (DeepSeekV3's names)

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
class DeepSeekV3(Family):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query (q_a/q_b, or one q_proj without q_lora_rank),
    the shared key/value latent with its rotary key (kv_a), its up projection (kv_b); sigmoid routing with the
    aux-free balancing bias; shared experts beside the routed ones."""

    latent: bool = True
    q_a = "self_attn.q_a_proj.weight"
    q_a_norm = "self_attn.q_a_layernorm.weight"
    q_b = "self_attn.q_b_proj.weight"
    kv_a = "self_attn.kv_a_proj_with_mqa.weight"
    kv_a_norm = "self_attn.kv_a_layernorm.weight"
    kv_b = "self_attn.kv_b_proj.weight"
    router_bias = "mlp.gate.e_score_correction_bias"
    shared_gate = "mlp.shared_experts.gate_proj.weight"
    shared_up = "mlp.shared_experts.up_proj.weight"
    shared_down = "mlp.shared_experts.down_proj.weight"


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
    router_bias="mlp.router.expert_bias", shared_fc1="mlp.shared_experts.linear_fc1.weight",
    shared_fc2="mlp.shared_experts.linear_fc2.weight",
    q_proj="self_attention.linear_q_proj.weight", q_down="self_attention.linear_q_down_proj.weight",
    q_up="self_attention.linear_q_up_proj.weight", q_lnorm="self_attention.q_layernorm.weight",
    kv_down="self_attention.linear_kv_down_proj.weight", kv_up="self_attention.linear_kv_up_proj.weight",
    kv_lnorm="self_attention.kv_layernorm.weight",
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
FAMILIES.register("deepseek_v3", DeepSeekV3())


@dataclass(frozen=True)
class Latent:
    """Multi-head latent attention's sizes (HF names: q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    qk_rope_head_dim, v_head_dim)."""

    q_rank: int | None  # None: one q_proj, no low-rank query
    kv_rank: int
    nope: int  # per head: the query/key dimensions without RoPE ...
    rope: int  # ... and with it (the key's rotary part is shared by all heads)
    v: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "Latent":
        """DeepSeek's attention as megatron-core's MLASelfAttention computes it; what it cannot is one line."""
        if cfg.get("rope_interleave", True) is False:
            raise R1Error("deepseek_v3 with rope_interleave=false: megatron-core's latent attention always "
                          "de-interleaves the rotary dimensions, so these weights would be rotated differently")
        if cfg.get("attention_bias"):
            raise R1Error("deepseek_v3 with attention_bias=true: megatron-core's latent attention has no biases "
                          "on its down projections")
        return cls(cfg.get("q_lora_rank"), cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                   cfg["v_head_dim"])


@dataclass(frozen=True)
class Experts:
    """A mixture of experts as an HF config describes it (what megatron-core's MoE layer is told)."""

    count: int  # routed experts
    topk: int
    ffn: int  # each expert's hidden size
    renormalize: bool  # softmax over the top-k logits (top-k weights sum to 1) vs top-k of the full softmax
    aux_coef: float
    moe_layers: tuple[bool, ...]  # per layer: experts (True) or a dense MLP
    score: str = "softmax"  # the router's score function; "sigmoid": DeepSeek-V3
    bias: bool = False  # DeepSeek-V3's expert bias (e_score_correction_bias), added to the scores for the choice only
    shared_ffn: int = 0  # the always-on shared experts' hidden size (all of them as one MLP)
    groups: int | None = None  # group-limited top-k: experts in `groups` groups, the best `group_topk` groups ...
    group_topk: int | None = None  # ... ranked by the sum of their best two scores
    scale: float = 1.0  # routed_scaling_factor on the routing weights

    @classmethod
    def from_hf(cls, cfg: dict) -> "Experts | None":
        kind, layers = cfg.get("model_type"), cfg["num_hidden_layers"]
        if kind == "deepseek_v3":
            return cls.deepseek_v3(cfg)
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

    @classmethod
    def deepseek_v3(cls, cfg: dict) -> "Experts":
        """Sigmoid scores, the expert bias for the choice, group-limited top-k, weights renormalised and scaled,
        shared experts, dense first layers: as megatron-core's router expresses them, or one line."""
        count, topk = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise R1Error(f"deepseek_v3 routing {cfg.get('scoring_func')}/{cfg.get('topk_method')}: megatron "
                          "expresses DeepSeek-V3's (sigmoid scores, noaux_tc top-k) only")
        if topk > 1 and not cfg.get("norm_topk_prob", True):
            raise R1Error("deepseek_v3 with norm_topk_prob=false: megatron-core's sigmoid router always "
                          "renormalises the top-k weights")
        groups, group_topk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
        if groups > 1 and group_topk < groups and topk // group_topk != 2:
            raise R1Error(f"deepseek_v3 group-limited routing ranks a group by its best 2 scores; megatron-core "
                          f"ranks it by its best top-k / topk_group = {topk // group_topk}")
        limited = groups > 1 and group_topk < groups  # all groups kept: plain top-k
        first = cfg.get("first_k_dense_replace", 0)  # (transformers reads no moe_layer_freq: every later layer)
        return cls(count, topk, cfg["moe_intermediate_size"], True, 0.0,
                   tuple(i >= first for i in range(cfg["num_hidden_layers"])), score="sigmoid",
                   bias=True, shared_ffn=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
                   groups=groups if limited else None, group_topk=group_topk if limited else None,
                   scale=float(cfg.get("routed_scaling_factor", 1.0)))


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
    latent: Latent | None = None  # multi-head latent attention

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        family = FAMILIES.get(cfg.get("model_type", "?"), "config.json model_type")
        heads = cfg["num_attention_heads"]
        latent = Latent.from_hf(cfg) if family.latent else None
        return cls(family, cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                   heads, heads if latent else cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["vocab_size"],
                   bool(cfg.get("tie_word_embeddings", False)), Experts.from_hf(cfg), latent)

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
        if shape.experts.shared_ffn % tp:
            problems.append(f"shared experts' hidden size {shape.experts.shared_ffn} is not divisible by "
                            f"tensor_parallel={tp}")
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


# the Transformer Engine spec fuses a norm into the linear layer after it where that layer is a plain one: the
# attention's input norm (not before latent attention's down projections), a dense MLP's norm (not before experts),
# latent attention's q and kv latent norms
_TE_FUSED = {MEGATRON["attn_norm"]: "self_attention.linear_qkv.layer_norm_weight",
             MEGATRON["mlp_norm"]: "mlp.linear_fc1.layer_norm_weight",
             MEGATRON["q_lnorm"]: "self_attention.linear_q_up_proj.layer_norm_weight",
             MEGATRON["kv_lnorm"]: "self_attention.linear_kv_up_proj.layer_norm_weight"}


def te_name(name: str, known) -> str:
    """A local-spec megatron name as a Transformer Engine spec model whose tensors are `known` calls it: the same
    name where that model has it, else the linear layer's fused norm weight."""
    if name in known:
        return name
    for local, te in _TE_FUSED.items():
        if name.endswith("." + local):
            return name[: -len(local)] + te
    return name
