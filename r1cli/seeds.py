"""Every seed a run derives from train.seed, in one place: each use nests its own counters (step, epoch, prompt
position, batch) under the run's seed, so that sharding or a resume draws the same numbers, and no two uses share a
stream. Changing a formula changes every run's samples: the constants stay."""

from __future__ import annotations


def sample_seed(seed: int, step: int, position: int) -> int:
    """r1 rl: the prompt at `position` of the global batch of `step` (its group samples from here on)."""
    return (seed * 1_000_003 + step) * 100_003 + position


def batch_seed(seed: int, first: int) -> int:
    """r1 sample / coldstart / eval: a batch named by its first prompt's index, so a redone batch samples the same."""
    return seed * 1_000_003 + first


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffled order of the data in one epoch."""
    return seed * 1_000_003 + epoch


def refill_seed(seed: int) -> int:
    """The stream of further prompts that DAPO dynamic sampling draws when a step's groups lack signal."""
    return seed * 1_000_003 + 104_729


def minibatch_seed(seed: int, step: int) -> int:
    """The order of a GRPO step's samples in its mini-batches."""
    return seed * 7919 + step


def second_pass_seed(seed: int) -> int:
    """A second generation over the same batch (cold start's reflecting pass)."""
    return seed + 7919
