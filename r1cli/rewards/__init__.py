"""Rewards: a registry of rule-based rewards (rules.py), task checkers (answers.py) and the scorer."""

from . import rules  # noqa: F401  registers the built-in rewards
from .answers import TASKS, extract_answer
from .scoring import REWARDS, RewardContext, Scores, score

__all__ = ["REWARDS", "TASKS", "RewardContext", "Scores", "extract_answer", "score"]
