"""Load Llama / Qwen2 / Qwen3-family models and the mixtures of experts Qwen3-MoE, Mixtral and DeepSeek-V3 from
local Hugging Face folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from r1cli.config import ModelConfig
from r1cli.errors import R1Error

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral", "deepseek_v3")  # the last three: experts


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


def param_dtype(name: str) -> torch.dtype:
    """The dtype parameters (and so AdamW's state) are kept in. `auto` is fp32 everywhere: in bf16 an AdamW update
    below 2^-8 of a weight rounds away (at lr 3e-6 most of them would); compute goes bf16 through autocast."""
    return {"auto": torch.float32, "bf16-mixed": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for none: bf16 over fp32 master weights under `bf16-mixed` on any device, and
    under `auto` on CUDA (so the GPU path's mixed precision also runs, and is tested, on a CPU)."""
    return torch.bfloat16 if name == "bf16-mixed" or (name == "auto" and device.type == "cuda") else None


def frozen_dtype(name: str, device: torch.device) -> str:
    """The dtype a frozen copy (the reference model) is held in: the compute dtype - bf16 under mixed precision,
    where its forward runs in bf16 anyway and fp32 masters would only double its memory - else the policy's."""
    return "bfloat16" if compute_dtype(name, device) == torch.bfloat16 else name


def autocast(name: str, device: torch.device):
    from contextlib import nullcontext

    dtype = compute_dtype(name, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data its offsets describe: a
    truncated or corrupt file fails here with its name instead of deep inside a loader."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise R1Error(f"{path}: not a valid safetensors file ({e})") from None
    if 8 + n + end != size:
        raise R1Error(f"{path}: truncated or corrupt safetensors file ({size} bytes, its header describes "
                      f"{8 + n + end})")


def check_model_folder(path: str) -> Path:
    import json

    if not path:
        raise R1Error("no model given (set model.path to a local Hugging Face folder)")
    p = Path(path)
    if not p.is_dir():
        raise R1Error(f"model folder not found: {path}")
    if not (p / "config.json").is_file():
        raise R1Error(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise R1Error(f"{p / 'config.json'}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    weights = sorted(p.glob("*.safetensors"))
    if not weights and not any(p.glob("*.bin")):
        raise R1Error(f"{path} has no weights (*.safetensors)")
    for w in weights:
        check_safetensors(w)
    return p


def context_length(path: str) -> int | None:
    """The model's context (config.json's max_position_embeddings), without loading it."""
    import json

    try:
        return int(json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    p = check_model_folder(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise R1Error(f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them from the "
                      "model's original folder")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device, weights: bool = True):
    """The causal LM on `device`, parameters in the configured dtype (fp32 under auto), weights from local
    safetensors; with weights=False, built from config.json alone on the meta device (no weights read, no memory:
    what a sharded load fills in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    p = check_model_folder(cfg.path)
    hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if hf_cfg.model_type not in SUPPORTED:
        raise R1Error(f"{cfg.path}: model type '{hf_cfg.model_type}' is not supported ({', '.join(SUPPORTED)})")
    if weights:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), local_files_only=True, dtype=param_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
        ).to(device)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=param_dtype(cfg.dtype),
                                                     attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def check_new_folder(out: str | Path, overwrite: bool) -> Path:
    """A folder a command is about to create: an existing non-empty one is kept unless overwrite."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise R1Error(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    return out


def publish_model_folder(model, tokenizer, out: str | Path, overwrite: bool) -> Path:
    """Write model + tokenizer into a temporary folder beside `out`, then swap it in: a crash never leaves a
    half-written model, and an existing one is replaced only with overwrite, and only once the new one is whole."""
    out = check_new_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out
