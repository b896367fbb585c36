"""The two interfaces the GRPO loop talks to: a trainer backend and a rollout engine.

The loop in r1cli never imports torch.distributed, megatron or vllm; a backend
that implements these methods drops in without touching it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    truncated: bool  # hit max_new_tokens without EOS or a stop string


@dataclass
class RolloutBatch:
    """What the trainer needs for one GRPO step: samples and their per-sample advantages.

    old_logp / ref_logp are [B, C] grids over completion tokens (C = longest completion),
    filled in by the trainer.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # [B]
    loss_weight: torch.Tensor  # [B] 1 = in the loss, 0 = filtered (overlong filtering)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def completion_mask(self) -> torch.Tensor:
        width = max(1, max(len(c) for c in self.completion_ids))
        m = torch.zeros(len(self), width)
        for i, c in enumerate(self.completion_ids):
            m[i, : len(c)] = 1.0
        return m

    def select(self, idx: list[int]) -> "RolloutBatch":
        pick = torch.tensor(idx, dtype=torch.long)
        width = max(1, max(len(self.completion_ids[i]) for i in idx))
        return RolloutBatch(
            [self.prompt_ids[i] for i in idx], [self.completion_ids[i] for i in idx],
            self.advantages[pick], self.loss_weight[pick],
            None if self.old_logp is None else self.old_logp[pick, :width],
            None if self.ref_logp is None else self.ref_logp[pick, :width],
        )


class TrainerBackend(Protocol):
    rank: int
    world_size: int
    is_main: bool

    def logprobs(self, batch: RolloutBatch, which: str = "policy") -> torch.Tensor: ...
    def grpo_step(self, batch: RolloutBatch, global_seqs: float, global_tokens: float) -> dict: ...
    def update_reference(self) -> None: ...
    def save(self, directory, extra: dict) -> None: ...
    def load(self, directory) -> dict: ...
    def export_hf(self, directory) -> None: ...
    def all_reduce_sum(self, value: float) -> float: ...
    def all_gather(self, obj) -> list: ...


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], n: int, seeds: list[int]) -> list[list[Completion]]: ...
    def load_weights(self, trainer: TrainerBackend) -> None: ...
