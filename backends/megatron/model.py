"""megatron-core's GPTModel from a Hugging Face config, with a family's layer options.

The local layer spec (plain torch layers) serves CPU runs; the Transformer Engine spec (flash attention, THD
packed sequences, FP8) is what a GPU run uses where transformer_engine imports (use_te_layers). Call after
`parallel_state.initialize_model_parallel`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1cli.backends.megatron.convert import LAYOUT_FILE, TensorFolder, rank_dir
from r1cli.backends.megatron.families import Shape, padded_vocab


def check_fp8() -> None:
    """model.precision=fp8 needs Transformer Engine and a GPU with FP8 tensor cores (compute capability 8.9+:
    Ada, Hopper, Blackwell): one line before anything is built."""
    from r1cli.errors import R1Error, missing_extra

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise missing_extra("transformer-engine", "te") from None
    if not torch.cuda.is_available():
        raise R1Error("model.precision=fp8 needs a GPU with FP8 tensor cores (Hopper class, compute capability "
                      "8.9 or newer); no CUDA device is visible")
    cc = torch.cuda.get_device_capability()
    if cc < (8, 9):
        raise R1Error(f"model.precision=fp8 needs a GPU with FP8 tensor cores (Hopper class, compute capability "
                      f"8.9 or newer); {torch.cuda.get_device_name()} is {cc[0]}.{cc[1]}")


def local_attention_bytes(width: int, rows: int, heads_per_rank: int, layers: int, elem: int,
                          recompute: str | None) -> int:
    """What megatron's local attention (no Transformer Engine) holds for one micro-batch of `rows` rows `width`
    tokens wide: per layer [rows, heads/TP, S, S] scores in the compute dtype and their fp32 softmax, both kept for
    the backward (softmax's output and the probabilities the value product reads) - for every layer, or one layer
    under recompute (full, or selective: megatron's core_attn) -, plus one layer's working copy and the [S, S] mask."""
    per_layer = rows * heads_per_rank * width * width * (elem + 4)
    kept = per_layer * (1 if recompute else layers)
    return kept + per_layer + rows * width * width


def check_local_attention(width: int, rows: int, heads_per_rank: int, layers: int, elem: int,
                          recompute: str | None, free: int) -> None:
    """One line, before the forward that would run out of memory, where the local attention's [S, S] scores do not
    fit: the memory plan (torch backend) counts flash attention, which megatron's local layers are not."""
    from r1cli.errors import R1Error

    need = local_attention_bytes(width, rows, heads_per_rank, layers, elem, recompute)
    if need > free:
        raise R1Error(f"megatron's local attention (no Transformer Engine) would hold {need / 2**30:.1f} GiB of "
                      f"[S x S] attention scores for {rows} row(s) of {width} tokens ({free / 2**30:.1f} GiB free): "
                      "install transformer-engine (pip install 'r1[te]', parallel.megatron.layers=te), set "
                      "model.gradient_checkpointing with parallel.megatron.recompute=selective, lower "
                      "train.max_tokens_per_micro_batch, or use parallel.backend=torch")


def use_te_layers(choice: str, fp8: bool, on_gpu: bool) -> bool:
    """Whether to build Transformer Engine layers (parallel.megatron.layers): FP8 needs them; on a GPU they are the
    default wherever transformer_engine imports, since megatron's local attention materialises [B x heads/TP, S, S]
    scores and an fp32 softmax copy (about 15 GB per layer at 7B, 8k tokens, micro-batch 4)."""
    from r1cli.errors import R1Error, missing_extra

    if fp8 and choice == "local":
        raise R1Error("model.precision=fp8 needs the Transformer Engine layers: parallel.megatron.layers=local "
                      "cannot run it")
    if choice == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    if choice == "te" or fp8:
        if not have_te:
            raise missing_extra("transformer-engine", "te")
        return True
    if on_gpu and not have_te:
        import sys

        print("note: megatron runs its local attention on this GPU ([heads, S, S] scores in memory); "
              "pip install 'r1[te]' for flash attention", file=sys.stderr)
    return on_gpu and have_te


def import_megatron():
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        from r1cli.errors import missing_extra

        raise missing_extra("megatron-core", "megatron") from None
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE:  # megatron-core 0.16.1's router asks `te_general_gemm is not None` without defining it
        moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
        from megatron.core.transformer import multi_latent_attention

        # without transformer_engine megatron's TE module hands out MagicMocks, which MLA's isinstance() rejects
        multi_latent_attention.HAVE_TE = False
    if not torch.cuda.is_available():
        from r1cli.backends.megatron import cpu_shims

        cpu_shims.install()


def rope_scaling(cfg: dict) -> tuple[str, dict]:
    """(kind, parameters) of an HF config's RoPE: `rope_scaling` (transformers 4 files) or `rope_parameters`
    (transformers 5); kind "default" when unscaled."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return scaling.get("rope_type", scaling.get("type")) or "default", scaling


def rope_theta(cfg: dict, allow: tuple[str, ...] = ()) -> float:
    """RoPE's base from an HF config: `rope_theta` (transformers 4 files) or `rope_parameters` (transformers 5);
    a scaled RoPE (linear, dynamic, yarn, llama3) is refused, since megatron's plain RoPE would silently differ
    (latent attention `allow`s yarn: its own YaRN embedding)."""
    kind, scaling = rope_scaling(cfg)
    if kind not in ("default", *allow):
        from r1cli.errors import R1Error

        raise R1Error(f"RoPE scaling {scaling} is not supported by the megatron backend yet")
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def latent_options(cfg: dict, s: Shape) -> dict:
    """megatron-core's MLATransformerConfig fields for DeepSeek's latent attention: its sizes, and its RoPE (plain,
    or YaRN with the HF config's factor, original length, betas and mscales; the softmax scale then carries
    mscale_all_dim as transformers' does). Megatron's defaults are DeepSeek-V3's YaRN: every field is set."""
    lat = s.latent
    kind, params = rope_scaling(cfg)
    base = dict(multi_latent_attention=True, q_lora_rank=lat.q_rank, kv_lora_rank=lat.kv_rank, qk_head_dim=lat.nope,
                qk_pos_emb_head_dim=lat.rope, v_head_dim=lat.v, rotary_base=rope_theta(cfg, allow=("yarn",)))
    if kind == "default":
        return dict(base, rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return dict(base, rope_type="yarn", rotary_scaling_factor=float(params["factor"]),
                original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                     or cfg["max_position_embeddings"]),
                beta_fast=float(params.get("beta_fast", 32)), beta_slow=float(params.get("beta_slow", 1)),
                mscale=float(params.get("mscale", 1)), mscale_all_dim=float(params.get("mscale_all_dim", 0)))


def moe_options(s: Shape, ep: int, bias_rate: float = 0.0) -> dict:
    """megatron-core's MoE settings for the HF config's experts: softmax routing, top-k renormalised or not (Qwen3-MoE's
    norm_topk_prob), the auxiliary load-balancing loss at the HF coefficient, dropless all-to-all dispatch, experts
    split over `ep` ranks; the router in fp32 as transformers runs it."""
    e = s.experts
    if e is None:
        return {}
    deepseek = dict(  # sigmoid scores + the expert bias for the choice (moved by bias_rate after each step; 0 keeps
        # the checkpoint's, as transformers trains it), group-limited top-k, scaled weights, shared experts
        moe_router_enable_expert_bias=e.bias, moe_router_bias_update_rate=bias_rate, moe_router_num_groups=e.groups,
        moe_router_group_topk=e.group_topk, moe_router_topk_scaling_factor=e.scale if e.scale != 1.0 else None,
        moe_shared_expert_intermediate_size=e.shared_ffn or None) if e.score == "sigmoid" else {}
    return dict(num_moe_experts=e.count, moe_router_topk=e.topk, moe_ffn_hidden_size=e.ffn,
                moe_router_score_function=e.score, moe_router_pre_softmax=not e.renormalize and e.score == "softmax",
                moe_router_load_balancing_type="aux_loss" if e.aux_coef else "none", moe_aux_loss_coeff=e.aux_coef,
                moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_router_dtype="fp32",
                moe_layer_freq=[int(x) for x in e.moe_layers], expert_model_parallel_size=ep, **deepseek)


# model.gradient_checkpointing on megatron, by parallel.megatron.recompute
RECOMPUTE = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"])}


def transformer_config(cfg: dict, tp: int, pp: int, dtype: torch.dtype = torch.float32, *,
                       sequence_parallel: bool = False, recompute: str | None = None, fp8: str | None = None,
                       ep: int = 1, cp: int = 1,
                       bias_rate: float = 0.0):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    s = Shape.from_hf(cfg)
    latent = latent_options(cfg, s) if s.latent else {}
    if not latent:
        rope_theta(cfg)  # an unsupported RoPE scaling is one line before anything is built
    on_gpu = torch.cuda.is_available()
    return (MLATransformerConfig if latent else TransformerConfig)(
        num_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads, num_query_groups=s.kv_heads,
        ffn_hidden_size=s.ffn, kv_channels=s.head_dim, normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=s.family.qkv_bias,
        qk_layernorm=s.family.qk_norm or bool(latent),  # (the latent norms are megatron's q/kv layernorms)
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not on_gpu, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=on_gpu, apply_rope_fusion=False,
        masked_softmax_fusion=False,  # the fused causal kernel would ignore the explicit mask of packed rows
        persist_layer_norm=False, gradient_accumulation_fusion=False, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, pipeline_dtype=dtype if pp > 1 else None, sequence_parallel=sequence_parallel,
        **RECOMPUTE.get(recompute, {}),
        **(dict(context_parallel_size=cp, cp_comm_type="p2p") if cp > 1 else {}),
        **(dict(fp8="hybrid", fp8_recipe={"delayed": "delayed", "current": "tensorwise"}[fp8]) if fp8 else {}),
        **moe_options(s, ep, bias_rate), **latent)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a megatron-core layer-spec module. megatron's own torch fallback refuses sequence
    parallelism; this one marks its weight `sequence_parallel` so that finalize_model_grads sums the weight's
    gradient over the TP ranks, each of which normalised its slice of the sequence."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def latent_core_attention():
    """megatron's local DotProductAttention for latent attention, whose values are narrower than its queries and
    keys (v_head_dim against qk_nope + qk_rope): megatron-core 0.16.1 builds MLA's core attention with k_channels
    and v_channels, which only Transformer Engine's attention takes. The scores and the softmax are the local
    module's; the context is reshaped by the value width."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)  # (megatron's Attention builds one without the widths first)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return LatentDotProductAttention


def layer_spec(cfg: dict, layers: range, te: bool = False):
    """The block spec of these (global) layers: megatron's local GPT layer (plain torch layers) with our RMSNorm
    everywhere, or (te) its Transformer Engine layer, whose linear layers run FP8 and carry the norms before them
    (families.te_name); a mixture of experts' layers get megatron's MoE layer (SequentialMLP experts), DeepSeek's
    its latent attention (MLASelfAttention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    s = Shape.from_hf(cfg)
    latent = s.latent is not None
    qk_norm = s.family.qk_norm or latent
    experts = {False: None, True: s.experts.count if s.experts else None}
    options = dict(moe_grouped_gemm=False, qk_layernorm=qk_norm, multi_latent_attention=latent)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # experts as a SequentialMLP of TE linear layers: grouped GEMM is not wired (moe_options sets it off)
        specs = {moe: get_gpt_layer_with_transformer_engine_spec(num_experts=n, **options)
                 for moe, n in experts.items()}
        return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
            layer_specs=[specs[s.is_moe(i)] for i in layers], layer_norm=TENorm))

    specs = {}
    for moe, n in experts.items():
        layer = get_gpt_layer_local_spec(num_experts=n, **options)
        sub = layer.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
        attention = sub.self_attention.submodules
        if latent:
            from megatron.core.post_training.modelopt.layers import Linear

            attention.q_layernorm = attention.kv_layernorm = RMSNorm
            attention.core_attention = latent_core_attention()
            # the down projections whole on every TP rank, as TE's MLA spec has them (TELinear, "duplicated"):
            # megatron's column-parallel choice gathers their outputs, whose backward leaves the shared rotary
            # key's gradient with the last rank's heads only; duplicated, its sequence-parallel gather sums all
            # heads and the weights' gradients sum over TP like a norm's (marked sequence_parallel)
            attention.linear_q_down_proj = attention.linear_kv_down_proj = Linear
        elif qk_norm:
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        specs[moe] = layer
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[specs[s.is_moe(i)] for i in layers], layer_norm=RMSNorm))


def build_gpt_model(cfg: dict, tp: int, pp: int, dtype: torch.dtype = torch.float32, te: bool = False, **options):
    """This rank's GPTModel (its pipeline stage, its tensor shards, its experts), with Transformer Engine layers
    when `te`; options: sequence_parallel, recompute (None, "full" or "selective"), fp8 (None, "delayed" or
    "current": the TE layers with that FP8 scaling recipe), ep (expert parallel ranks), cp (context parallel ranks:
    TE's ring attention), bias_rate (DeepSeek-V3's expert bias update per step)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    s = Shape.from_hf(cfg)
    per, stage = s.layers // pp, ps.get_pipeline_model_parallel_rank()
    return GPTModel(
        config=transformer_config(cfg, tp, pp, dtype, **options),
        transformer_layer_spec=layer_spec(cfg, range(stage * per, (stage + 1) * per),
                                          te=te or options.get("fp8") is not None),
        vocab_size=padded_vocab(s.vocab, tp), max_sequence_length=cfg["max_position_embeddings"],
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=s.tied, position_embedding_type="rope",
        rotary_base=rope_theta(cfg, allow=("yarn",) if s.latent else ()))


def follow_position_ids(model) -> None:
    """Rotary embeddings at `model.position_ids` ([B, S], set before each forward) instead of 0..S-1.

    megatron-core's RoPE always counts positions 0..S-1; packed SFT rows restart their positions at every sample
    (as the torch backend feeds transformers), so the angles are looked up per row: [S, B, 1, D] broadcasts over
    the heads exactly like megatron's own [S, 1, 1, D]. Latent attention keeps a RoPE in each layer (plain or
    YaRN, which also hands back its mscale): each follows the model's position_ids."""
    model.position_ids = None
    ropes = [model.rotary_pos_emb] if hasattr(model, "rotary_pos_emb") else [
        m.rotary_pos_emb for m in model.modules() if hasattr(m, "rotary_pos_emb") and m is not model]
    for rope in ropes:
        rope.forward = _rope_at_positions(model, rope, rope.forward)


def _rope_at_positions(model, rope, own):
    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        pos = model.position_ids
        if pos is None or packed_seq:  # THD sequences: megatron restarts the angles at each cu_seqlens boundary
            return own(max_seq_len, offset=offset, packed_seq=packed_seq)
        out = own(max(int(pos.max()) + 1, max_seq_len))
        table, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())  # YaRN: (angles, mscale)
        angles = table[:, 0, 0, :][pos.t()].unsqueeze(2)  # [S, B, 1, D]
        return (angles, *extra) if extra else angles

    return forward


def output_hidden_states(model) -> None:
    """Make the last stage's output layer hand back its input (the final hidden states, whole sequence) so the
    loss can run the vocabulary-parallel kernels on them and this rank's shard of the weight."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    layer = model.output_layer
    sequence_parallel = model.config.sequence_parallel

    def forward(hidden, weight=None, runtime_gather_output=None):
        if sequence_parallel:  # the kernels all-reduce d(hidden) over TP themselves: the backward only splits
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None

    layer.forward = forward


def load_converted(model, folder: Path, rename=lambda name: name) -> None:
    """Load this rank's shard of a `r1 convert hf-to-megatron` folder (strict: every weight, nothing else)."""
    from megatron.core import parallel_state as ps

    layout = Path(folder) / LAYOUT_FILE
    ep = json.loads(layout.read_text()).get("expert_parallel", 1) if layout.is_file() else 1
    files = TensorFolder(Path(folder) / rank_dir(ps.get_tensor_model_parallel_rank(),
                                                 ps.get_pipeline_model_parallel_rank(),
                                                 ps.get_expert_model_parallel_rank() if ep > 1 else None))
    missing, unexpected = model.load_state_dict({rename(n): files.get(n) for n in files.where}, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: missing {missing}, unexpected {unexpected}")


def hf_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
