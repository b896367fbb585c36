"""Weights under their checkpoint names, whatever a transformers model calls them in memory.

transformers 5 fuses some checkpoint tensors into one parameter when it loads a model - a mixture of experts'
`experts.{e}.gate_proj / up_proj / down_proj` (Mixtral: `block_sparse_moe.experts.{e}.w1 / w3 / w2`) become
`mlp.experts.gate_up_proj [E, 2I, H]` and `mlp.experts.down_proj [E, H, I]` - and splits them again when it saves.
Everything that moves weights between r1's parts (a trainer's named_weights, a rollout engine's load_weights, the
Megatron converter, vLLM) speaks the checkpoint names, as the model's files on disk do.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

_LAYER = re.compile(r"^(.*?layers\.\d+\.)")
_EXPERT = re.compile(r"^(?P<layer>.*?layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                     r"(?P<w>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_ROUTER = re.compile(r"^(?P<layer>.*?layers\.\d+\.)block_sparse_moe\.gate\.weight$")


def fused(model) -> bool:
    """Whether the model holds tensors its checkpoint names differ from (fused experts)."""
    return any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name, _ in model.named_parameters())


def to_checkpoint_names(model, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(in-memory name, tensor) pairs as (checkpoint name, tensor), one decoder layer at a time (transformers'
    own save-time conversion); a model without fused tensors passes through unchanged."""
    if not fused(model):
        yield from weights
        return
    from transformers.core_model_loading import revert_weight_conversion

    group: dict[str, torch.Tensor] = {}
    prefix = None
    for name, tensor in weights:
        m = _LAYER.match(name)
        here = m.group(1) if m else name
        if group and here != prefix:
            yield from revert_weight_conversion(model, group).items()
            group = {}
        prefix = here
        group[name] = tensor
    if group:
        yield from revert_weight_conversion(model, group).items()


def load_checkpoint_named(model, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (checkpoint name, tensor) pairs into the model's parameters in place, each expert's tensors into its
    slice of the fused ones: gate (w1) the first half of gate_up_proj[e], up (w3) the second, down (w2) down_proj[e]."""
    params = model.state_dict()
    with torch.no_grad():
        for name, t in weights:
            if name in params:
                params[name].copy_(t)
                continue
            m, r = _EXPERT.match(name), _ROUTER.match(name)
            if m is not None:
                layer, e, w = m.group("layer"), int(m.group("e")), m.group("w")
                if w in ("down_proj", "w2"):
                    target = _param(params, layer + "mlp.experts.down_proj", name)[e]
                else:
                    fused_ = _param(params, layer + "mlp.experts.gate_up_proj", name)[e]
                    half = fused_.shape[0] // 2
                    target = fused_[:half] if w in ("gate_proj", "w1") else fused_[half:]
                target.copy_(t)
            elif r is not None:
                _param(params, r.group("layer") + "mlp.gate.weight", name).copy_(t)
            else:
                raise KeyError(f"load_weights: the engine's model has no weight named {name!r}")


def _param(params: dict, own: str, name: str) -> torch.Tensor:
    if own not in params:
        raise KeyError(f"load_weights: the engine's model has no weight named {name!r} (nor {own!r})")
    return params[own]
