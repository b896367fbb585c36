"""A critic's value head: a causal LM whose lm_head is a [1 x hidden] projection, so that the hidden state at a
token's position gives V of the state before that token (PPO with GAE, grpo.advantage=gae)."""

from __future__ import annotations

import torch
import torch.nn as nn


def to_value_head(model: nn.Module) -> None:
    """The lm_head becomes a zero [1 x hidden] head, untied from the embeddings: V = 0 everywhere at the start, and the
    body trains as soon as the head is non-zero (a zero head gives the same first values on every run and rank)."""
    old = model.lm_head.weight
    model.config.tie_word_embeddings = False
    model.lm_head = nn.Linear(old.shape[1], 1, bias=False, device=old.device, dtype=old.dtype)
    if old.device.type != "meta":
        with torch.no_grad():
            model.lm_head.weight.zero_()


def values_at(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """[N] values: hidden states [N, H] through the [1, H] head, in fp32 whatever the autocast around it."""
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.float() @ head.float().t()).squeeze(-1)
