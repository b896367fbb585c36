"""critic: PPO's learned value model (grpo.advantage=gae)."""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.config.fields import bounded


@dataclass
class CriticConfig:
    """The value model of PPO with GAE (Open-Reasoner-Zero, VAPO): a copy of a causal LM whose lm_head is replaced by
    a zero-initialised [1 x hidden] value head, trained beside the policy with its own AdamW; torch backend."""

    path: str = ""  # a local Hugging Face folder the critic starts from; "": model.path (the policy's start)
    lr: float = bounded(5e-6, 0.0)  # the critic's AdamW learning rate (optim's other settings are shared)
    value_clip: float = bounded(0.2, 0.0)  # V clipped to old V +- this in the value loss (PPO's); 0: no clip
    gamma: float = bounded(1.0, 0.0, 1.0)  # GAE's discount per token (1: the undiscounted outcome reward)
    lam: float = bounded(0.95, 0.0, 1.0)  # GAE's lambda (1: Monte-Carlo returns; 0: one-step TD)
    # advantages whitened over every completion token of the step, all data-parallel ranks (as OpenRLHF, ORZ)
    whiten: bool = True
    # the first N steps train the critic alone (the policy's optimizer steps skipped) so that its values are
    # meaningful before they shape the policy's advantages; 0: both from the first step
    warmup_steps: int = bounded(0, 0)
