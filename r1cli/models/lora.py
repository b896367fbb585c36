"""LoRA adapters through peft: put them on a transformers model, switch them off, merge them, write them.

The trainer keeps the transformers model itself (peft replaces its target linears in place with LoRA layers), so
everything that walks the model (FSDP, the hidden-state loss, generate) is unchanged. What differs lives here:
the adapters' names, their merged weights under the base model's Hugging Face names (what a rollout engine and the
merged export receive), the reference policy as the same model with the adapters off, and the PEFT adapter folder.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from r1cli.config import LoraConfig
from r1cli.errors import R1Error

ADAPTER = "default"  # peft's name for the one adapter r1 trains


def enabled(cfg: LoraConfig) -> bool:
    return cfg.rank > 0


def refuse(cfg: LoraConfig, command: str) -> None:
    """Commands that only generate read model.path as it is: adapters set for them would be silently ignored."""
    if enabled(cfg):
        raise R1Error(f"model.lora is read by the training commands; r1 {command} generates from model.path as it "
                      "is (a LoRA run's merged model is its hf/ folder): drop model.lora")


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    targets: str | list[str] = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          layers_to_transform=list(cfg.layers) or None, use_rslora=cfg.rslora, bias="none",
                          task_type="CAUSAL_LM")


def add_adapters(model: nn.Module, cfg: LoraConfig):
    """LoRA layers in place of the target linears of `model` (on any device, the meta device included); every other
    parameter frozen. Returns the peft wrapper (its config writes the adapter folder); `model` stays the model to
    run. B starts at zero, so the adapted model starts equal to the base."""
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = get_peft_model(model, peft_config(cfg))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        first = str(e).strip().splitlines()[0]
        raise R1Error(f"model.lora: {first} (model.lora.target_modules={cfg.target_modules}, "
                      f"model.lora.layers={cfg.layers})") from None
    return wrapper  # peft froze the rest and keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> LoRA layer (a target linear with its adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def adapters_off(model: nn.Module):
    """The base model: every LoRA layer computes its base linear alone (the reference policy, at no memory cost)."""
    layers = list(adapter_modules(model).values())
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged_weights(model: nn.Module,
                   full: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of the adapted model with each adapter folded in, W + scaling * B @ A, computed
    in fp32 and given in the base weight's dtype, under the names the base model's own folder uses. `full` turns a
    (possibly sharded) state-dict tensor into the whole tensor; every rank calls this in the same order."""
    sd = model.state_dict()
    scaling = {name: m.scaling[ADAPTER] for name, m in adapter_modules(model).items()}
    for name, t in sd.items():
        if is_adapter(name):
            continue
        if name.endswith(".base_layer.weight"):
            module = name[: -len(".base_layer.weight")]
            w = full(t)
            a = full(sd[f"{module}.lora_A.{ADAPTER}.weight"]).float()
            b = full(sd[f"{module}.lora_B.{ADAPTER}.weight"]).float()
            yield f"{module}.weight", (w.float() + scaling[module] * (b @ a)).to(w.dtype)
        else:
            yield name.replace(".base_layer.", "."), full(t)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' parameters, in the model's order (the checkpoint's keys: their names in `model`)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def write_adapter_folder(wrapper, tensors: dict[str, torch.Tensor], base_path: str, directory: Path) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(base, directory)` loads; `tensors` are the adapters under their names in the model."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    prefixed = {"base_model.model." + k: v for k, v in tensors.items()}
    sd = get_peft_model_state_dict(wrapper, state_dict=prefixed, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = wrapper.peft_config[ADAPTER].to_dict()
    config["base_model_name_or_path"] = base_path
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
