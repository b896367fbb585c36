"""Load Llama / Qwen2 / Qwen3-family models from local Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch

from r1cli.config import ModelConfig
from r1cli.errors import R1Error

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def quiet_transformers() -> None:
    """Loading bars from transformers would interleave with our own progress display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise R1Error("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_folder(path: str) -> Path:
    if not path:
        raise R1Error("no model given (set model.path to a local Hugging Face folder)")
    p = Path(path)
    if not p.is_dir():
        raise R1Error(f"model folder not found: {path}")
    if not (p / "config.json").is_file():
        raise R1Error(f"{path} is not a Hugging Face model folder (no config.json)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise R1Error(f"{path} has no weights (*.safetensors)")
    return p


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    p = check_model_folder(path)
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device):
    """The causal LM on `device`, in the configured dtype, weights from local safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    p = check_model_folder(cfg.path)
    hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if hf_cfg.model_type not in SUPPORTED:
        raise R1Error(f"{cfg.path}: model type '{hf_cfg.model_type}' is not supported ({', '.join(SUPPORTED)})")
    model = AutoModelForCausalLM.from_pretrained(
        str(p), local_files_only=True, dtype=resolve_dtype(cfg.dtype, device),
        attn_implementation=cfg.attn_implementation,
    ).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model
