"""Build a real Hugging Face model folder with random weights and a small trained tokenizer.

For tests and the CPU quick start: the folder loads through the same code path as
a downloaded Qwen or Llama checkpoint (config.json, model.safetensors, tokenizer.json,
chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from r1cli.data.synth import generate
from r1cli.data.templates import R1_ZERO_TEMPLATE
from r1cli.errors import R1Error

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Reasoning tags are whole tokens (as in Qwen's and DeepSeek's vocabularies) so a tiny
# model does not have to learn to spell them.
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


FAMILIES = ("qwen2", "llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3")
MOE = ("qwen3_moe", "mixtral", "deepseek_v3")


@dataclass
class TinySpec:
    family: str = "qwen2"  # one of FAMILIES; qwen3_moe, mixtral, deepseek_v3 are mixtures of experts
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    vocab_size: int = 512  # BPE target; the final size is what the trainer reaches
    tie_word_embeddings: bool = True
    seed: int = 0
    extra_corpus: list[str] = field(default_factory=list)
    # mixtures of experts (the MoE families): routed experts, experts per token, each expert's hidden size
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True  # the top-k routing weights renormalised to sum to 1 (Qwen3-MoE, DeepSeek-V3)
    router_aux_loss_coef: float = 0.001  # the load-balancing loss's weight (qwen3_moe, mixtral)
    n_shared_experts: int = 1  # deepseek_v3: always-on experts beside the routed ones
    first_k_dense_replace: int = 1  # deepseek_v3: the first layers keep a dense MLP
    kv_lora_rank: int = 32  # deepseek_v3's multi-head latent attention
    q_lora_rank: int = 0  # 0: no low-rank query (DeepSeek-V2-Lite style)
    n_group: int = 1  # deepseek_v3: group-limited routing, the experts in n_group groups of which ...
    topk_group: int = 1  # ... the best topk_group are open to each token
    routed_scaling_factor: float = 1.0  # deepseek_v3: the routing weights' scale
    qk_rope_head_dim: int = 8
    qk_nope_head_dim: int = 16
    v_head_dim: int = 16


def load_spec(path: str | None) -> TinySpec:
    if not path:
        return TinySpec()
    p = Path(path)
    if not p.is_file():
        raise R1Error(f"tiny model spec not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    names = TinySpec.__dataclass_fields__
    bad = [k for k in data if k not in names]
    if bad:
        raise R1Error(f"{path}: unknown key '{bad[0]}' (valid: {', '.join(names)})")
    return TinySpec(**data)


def _corpus(spec: TinySpec) -> list[str]:
    rows = generate("arithmetic", 500, seed=1, digits=3, ops="+-*") + generate("countdown", 300, seed=2)
    text = [r["prompt"] + " " + r["response"] for r in rows]
    text += [R1_ZERO_TEMPLATE, "The quick brown fox jumps over the lazy dog. " * 4, "user assistant system"]
    return text * 3 + list(spec.extra_corpus)


def build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # digits one by one: column arithmetic is learnable only if 37 is "3","7"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer=trainer)
    tok.add_tokens(TAGS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def moe_config(spec: TinySpec) -> dict:
    """The HF config keys of a MoE family's experts and router (each family names them its own way)."""
    if spec.family not in MOE:
        return {}
    if spec.num_experts_per_tok > spec.num_experts:
        raise R1Error(f"num_experts_per_tok={spec.num_experts_per_tok} is more than num_experts={spec.num_experts}")
    if spec.family == "qwen3_moe":
        return dict(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                    moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                    decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=spec.router_aux_loss_coef)
    if spec.family == "mixtral":  # every expert as large as the dense MLP would be; top-k weights renormalised
        return dict(num_local_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                    intermediate_size=spec.moe_intermediate_size, router_aux_loss_coef=spec.router_aux_loss_coef)
    return dict(n_routed_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                n_shared_experts=spec.n_shared_experts, first_k_dense_replace=spec.first_k_dense_replace,
                n_group=spec.n_group, topk_group=spec.topk_group, routed_scaling_factor=spec.routed_scaling_factor,
                kv_lora_rank=spec.kv_lora_rank,
                q_lora_rank=spec.q_lora_rank or None, qk_rope_head_dim=spec.qk_rope_head_dim,
                qk_nope_head_dim=spec.qk_nope_head_dim, v_head_dim=spec.v_head_dim,
                head_dim=spec.qk_rope_head_dim, rope_interleave=True,
                num_key_value_heads=spec.num_attention_heads)  # latent attention: no grouped key/value heads


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1cli.models.loading import check_new_folder, publish_model_folder, quiet_transformers

    quiet_transformers()
    spec = spec or TinySpec()
    check_new_folder(out_dir, overwrite)
    tok = build_tokenizer(spec)
    head_dim = spec.hidden_size // spec.num_attention_heads
    kw = dict(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=10000.0,
    )
    if spec.family not in FAMILIES:
        raise R1Error(f"tiny model family '{spec.family}' is not one of {', '.join(FAMILIES)}")
    if spec.family in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = head_dim
    kw.update(moe_config(spec))
    config = AutoConfig.for_model(spec.family, **kw)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # as a trained model's aux-free balancing leaves it
            buffer.copy_(0.1 * torch.randn(buffer.shape))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return publish_model_folder(model, tok, out_dir, overwrite)
