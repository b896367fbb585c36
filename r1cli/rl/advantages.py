"""Group-relative advantages: one scalar per sample, computed within its prompt's group of G.

    grpo   : A_i = (R_i - mean(R)) / (std(R) + eps)           DeepSeekMath / R1
    drgrpo : A_i =  R_i - mean(R)                              Dr. GRPO (no std normalisation)
    rloo   : A_i =  R_i - mean_{j != i} R_j                     Ahmadian et al. 2024
"""

from __future__ import annotations

import torch

from r1cli.registry import Registry

ADVANTAGES = Registry("advantage estimator", "grpo.advantage")  # [n_groups, G] rewards -> advantages


@ADVANTAGES.register("grpo")
def grpo_advantage(r: torch.Tensor, eps: float) -> torch.Tensor:
    # unbiased std (torch default), as in the reference implementations
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if r.shape[-1] > 1 else torch.zeros_like(mean)
    return (r - mean) / (std + eps)


grpo_advantage.divides_by_std = True  # a group of equal rewards is 0 / (0 + eps): eps must be > 0


@ADVANTAGES.register("drgrpo")
def drgrpo_advantage(r: torch.Tensor, eps: float) -> torch.Tensor:
    return r - r.mean(-1, keepdim=True)


@ADVANTAGES.register("rloo")
def rloo_advantage(r: torch.Tensor, eps: float) -> torch.Tensor:
    g = r.shape[-1]
    if g < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    return (r - r.mean(-1, keepdim=True)) * g / (g - 1)  # = R_i - mean of the others


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards: [n_groups * G] laid out group by group -> advantages of the same shape."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).to(torch.float64)
    return ADVANTAGES.get(estimator)(r, eps).view(-1).to(rewards.dtype)


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
