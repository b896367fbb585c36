"""What a loss call leaves beside its value: per-token by-products for metrics. It lives in the lowest layer so
that kernels, SFT and RL all use it without depending on each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class TokenRecord:
    """Per-token by-products of a loss call, for metrics (all detached)."""

    logp: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor | None


class ElementwiseObjective(Protocol):
    """What the fused GRPO kernels read of an objective spec (r1cli.rl.objective.GRPOObjective is one): scalars
    for the Triton kernels, and the elementwise loss of a chunk of tokens for the fused-linear paths."""

    @property
    def eps_low(self) -> float: ...
    @property
    def eps_high(self) -> float: ...
    @property
    def dual_clip(self) -> float: ...
    @property
    def beta(self) -> float: ...
    @property
    def kl(self) -> str: ...
    @property
    def entropy_coef(self) -> float: ...
    @property
    def ratio_level(self) -> str: ...
    @property
    def policy_loss(self) -> str: ...
    @property
    def temperature(self) -> float: ...
    @property
    def clamp(self) -> float: ...
    @property
    def needs_entropy(self) -> bool: ...
    @property
    def elementwise(self) -> bool: ...

    def per_token(self, logp: torch.Tensor, entropy: torch.Tensor | None, old_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, TokenRecord]: ...

    def chunked(self, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor) -> Callable[..., tuple[torch.Tensor, TokenRecord]]: ...
