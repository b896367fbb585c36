"""rewards: which rewards score a completion, with their weights and models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1cli.config.fields import bounded, named


@dataclass
class RewardModelConfig:
    """The reward_model reward (rewards.weights.reward_model): a local Hugging Face sequence-classification model
    scores each (prompt, response) conversation; its first logit is the reward."""

    path: str = ""  # the reward model's local folder
    batch_size: int = bounded(16, 1)  # conversations scored per forward
    normalize: Literal["none", "sigmoid", "batch"] = "none"  # batch: z-scores over the step's samples
    offload: bool = True  # on a GPU: to host memory between scoring calls (the trainer needs the memory)
    max_tokens: int = bounded(4096, 1)  # longer conversations keep their last max_tokens tokens


@dataclass
class JudgeRewardConfig:
    """The judge reward (rewards.weights.judge): a local generative model, through the rollout engine registry,
    reads each answer and gives a verdict (yes / no) or a score; cached per (prompt, response)."""

    path: str = ""  # the judge's local model folder
    engine: str = named("auto", "r1cli.interfaces:ENGINES")  # its own engine (rollout.vllm's settings apply)
    # a template file with {question}, {response}, {reasoning}, {answer} and {reference} (the row's answer); empty:
    # the built-in yes/no question
    template: str = ""
    verdict: Literal["yes_no", "score"] = "yes_no"  # score: the reply's first number divided by max_score
    # verdict score: the reply's number is divided by this (then clipped to [0, 1])
    max_score: float = bounded(10.0, 0.0, above=True)
    max_new_tokens: int = bounded(16, 1)  # tokens the judge may write for its verdict


@dataclass
class RewardsConfig:
    # reward name -> weight; the total reward is the weighted sum (r1cli.rewards registry)
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1},
                                      metadata={"registry": "r1cli.rewards:REWARDS"})
    language: str = "en"  # target language of the chain of thought (language reward)
    # a chain of thought with fewer words earns no language reward (an empty or digits-only one would score 1.0)
    language_min_words: int = bounded(8, 0)
    # a reward call (one sample, or one batch per sample in it) running longer is that sample's 0, counted in
    # reward_failures/NAME; 0: no limit
    timeout_s: float = bounded(60.0, 0.0)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    judge: JudgeRewardConfig = field(default_factory=JudgeRewardConfig)
