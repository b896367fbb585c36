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
    if not torch.cuda.is_available():
        from r1cli.backends.megatron import cpu_shims

        cpu_shims.install()


def rope_theta(cfg: dict) -> float:
    """RoPE's base from an HF config: `rope_theta` (transformers 4 files) or `rope_parameters` (transformers 5);
    a scaled RoPE (linear, dynamic, yarn, llama3) is refused, since megatron's plain RoPE would silently differ."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        from r1cli.errors import R1Error

        raise R1Error(f"RoPE scaling {scaling} is not supported by the megatron backend yet")
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def moe_options(s: Shape, ep: int) -> dict:
    """megatron-core's MoE settings for the HF config's experts: softmax routing, top-k renormalised or not (Qwen3-MoE's
    norm_topk_prob), the auxiliary load-balancing loss at the HF coefficient, dropless all-to-all dispatch, experts
    split over `ep` ranks; the router in fp32 as transformers runs it."""
    e = s.experts
    if e is None:
        return {}
    return dict(num_moe_experts=e.count, moe_router_topk=e.topk, moe_ffn_hidden_size=e.ffn,
                moe_router_score_function="softmax", moe_router_pre_softmax=not e.renormalize,
                moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=e.aux_coef,
                moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_router_dtype="fp32",
                moe_layer_freq=[int(x) for x in e.moe_layers], expert_model_parallel_size=ep)


def transformer_config(cfg: dict, tp: int, pp: int, dtype: torch.dtype = torch.float32, *,
                       sequence_parallel: bool = False, recompute: bool = False, fp8: str | None = None, ep: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = Shape.from_hf(cfg)
    rope_theta(cfg)  # an unsupported RoPE scaling is one line before anything is built
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads, num_query_groups=s.kv_heads,
        ffn_hidden_size=s.ffn, kv_channels=s.head_dim, normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=s.family.qkv_bias,
        qk_layernorm=s.family.qk_norm, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not on_gpu, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=on_gpu, apply_rope_fusion=False,
        masked_softmax_fusion=False,  # the fused causal kernel would ignore the explicit mask of packed rows
        persist_layer_norm=False, gradient_accumulation_fusion=False, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, pipeline_dtype=dtype if pp > 1 else None, sequence_parallel=sequence_parallel,
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}),
        **(dict(fp8="hybrid", fp8_recipe={"delayed": "delayed", "current": "tensorwise"}[fp8]) if fp8 else {}),
        **moe_options(s, ep))


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a megatron-core layer-spec module. megatron's own torch fallback refuses sequence
    parallelism; this one marks its weight `sequence_parallel` so that finalize_model_grads sums the weight's
    gradient over the TP ranks, each of which normalised its slice of the sequence."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(cfg: dict, layers: range, te: bool = False):
    """The block spec of these (global) layers: megatron's local GPT layer (plain torch layers) with our RMSNorm
    everywhere, or (te) its Transformer Engine layer, whose linear layers run FP8 and carry the norms before them
    (families.te_name); a mixture of experts' layers get megatron's MoE layer (SequentialMLP experts)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    s = Shape.from_hf(cfg)
    qk_norm = s.family.qk_norm
    experts = {False: None, True: s.experts.count if s.experts else None}
    if te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # experts as a SequentialMLP of TE linear layers: grouped GEMM is not wired (moe_options sets it off)
        specs = {moe: get_gpt_layer_with_transformer_engine_spec(num_experts=n, moe_grouped_gemm=False,
                                                                 qk_layernorm=qk_norm) for moe, n in experts.items()}
        return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
            layer_specs=[specs[s.is_moe(i)] for i in layers], layer_norm=TENorm))

    specs = {}
    for moe, n in experts.items():
        layer = get_gpt_layer_local_spec(num_experts=n, moe_grouped_gemm=False, qk_layernorm=qk_norm)
        sub = layer.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
        if qk_norm:
            sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = RMSNorm
        specs[moe] = layer
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[specs[s.is_moe(i)] for i in layers], layer_norm=RMSNorm))


def build_gpt_model(cfg: dict, tp: int, pp: int, dtype: torch.dtype = torch.float32, te: bool = False, **options):
    """This rank's GPTModel (its pipeline stage, its tensor shards, its experts), with Transformer Engine layers
    when `te`; options: sequence_parallel, recompute, fp8 (None, "delayed" or "current": the TE layers with that FP8
    scaling recipe), ep (expert parallel ranks)."""
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
        rotary_base=rope_theta(cfg))


def follow_position_ids(model) -> None:
    """Rotary embeddings at `model.position_ids` ([B, S], set before each forward) instead of 0..S-1.

    megatron-core's RoPE always counts positions 0..S-1; packed SFT rows restart their positions at every sample
    (as the torch backend feeds transformers), so the angles are looked up per row: [S, B, 1, D] broadcasts over
    the heads exactly like megatron's own [S, 1, 1, D]."""
    rope = model.rotary_pos_emb
    model.position_ids = None

    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        pos = model.position_ids
        if pos is None or packed_seq:  # THD sequences: megatron restarts the angles at each cu_seqlens boundary
            return rope.get_emb(max_seq_len, offset)
        table = rope.get_emb(max(int(pos.max()) + 1, max_seq_len))[:, 0, 0, :]  # [positions, D]
        return table[pos.t()].unsqueeze(2)  # [S, B, 1, D]

    rope.forward = forward


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
