"""Rewards: a registry of rule-based rewards (rules.py), task checkers (answers.py) and the scorer.

`reward` and `task` are the decorators that register a reward (a key of rewards.weights) or a task checker (a row's
task): the built-ins use them, and so does a user's plugin file (r1cli.plugins).
"""

from . import model_rewards, rules  # noqa: F401  register the built-in rewards
from .answers import TASKS, check_task_rows, extract_answer, task
from .scoring import REWARDS, RewardContext, Scores, reward, score

__all__ = ["REWARDS", "TASKS", "RewardContext", "Scores", "check_task_rows", "extract_answer", "reward", "score",
           "task"]
