"""The reward registry and the scorer: a weighted sum of named rule-based rewards per sample.

A reward is `fn(completion, row, ctx) -> float`; a reward that raises counts as 0 for
that sample (counted and reported), never the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from r1cli.config import DataConfig, RewardsConfig
from r1cli.registry import Registry


@dataclass(frozen=True)
class RewardContext:
    prefill: str = ""  # text the prompt already put at the start of the assistant turn
    language: str = "en"
    answer_field: str = "answer"
    task_field: str = "task"

    def full(self, completion: str) -> str:
        """The assistant turn as written: the prefill the prompt ended with, then the completion."""
        if self.prefill and not completion.startswith(self.prefill):
            return self.prefill + completion
        return completion

    @classmethod
    def from_config(cls, data: DataConfig, rewards: RewardsConfig) -> "RewardContext":
        return cls(prefill=data.prefill, language=rewards.language, answer_field=data.answer_field,
                   task_field=data.task_field)


RewardFn = Callable[[str, dict, RewardContext], float]
REWARDS = Registry("reward", "rewards.weights")


@dataclass
class Scores:
    total: list[float]
    components: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


def score(completions: list[str], rows: list[dict], weights: dict[str, float], ctx: RewardContext) -> Scores:
    """Weighted sum of the configured rewards for each (completion, row) pair."""
    fns = {name: REWARDS.get(name) for name in weights}
    comps: dict[str, list[float]] = {name: [] for name in weights}
    failures: dict[str, int] = {}
    last_error: dict[str, str] = {}
    for text, row in zip(completions, rows):
        for name, fn in fns.items():
            try:
                v = float(fn(text, row, ctx))
            except Exception as e:  # noqa: BLE001 - one sample's checker failing is that sample's 0
                failures[name] = failures.get(name, 0) + 1
                last_error[name] = f"{type(e).__name__}: {e}"
                v = 0.0
            comps[name].append(v)
    total = [sum(weights[n] * comps[n][i] for n in weights) for i in range(len(completions))]
    return Scores(total, comps, failures, last_error)
