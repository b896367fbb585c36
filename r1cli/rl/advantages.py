"""Group-relative advantages: one scalar per sample, computed within its prompt's group of G.

    grpo   : A_i = (R_i - mean(R)) / (std(R) + eps)           DeepSeekMath / R1
    drgrpo : A_i =  R_i - mean(R)                              Dr. GRPO (no std normalisation)
    rloo   : A_i =  R_i - mean_{j != i} R_j                     Ahmadian et al. 2024
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards: [n_groups * G] laid out group by group -> advantages of the same shape."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).to(torch.float64)
    mean = r.mean(-1, keepdim=True)
    if estimator == "grpo":
        # unbiased std (torch default), as in the reference implementations
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = (r - mean) / (std + eps)
    elif estimator == "drgrpo":
        adv = r - mean
    elif estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        adv = (r - mean) * group_size / (group_size - 1)  # = R_i - mean of the others
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r} ({', '.join(ESTIMATORS)})")
    return adv.view(-1).to(rewards.dtype)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: groups whose rewards are all the same (no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)
