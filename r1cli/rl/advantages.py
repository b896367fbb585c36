"""Group-relative advantages: one scalar per sample, computed within its prompt's group of G.

    grpo   : A_i = (R_i - mean(R)) / (std(R) + eps)           DeepSeekMath / R1
    drgrpo : A_i =  R_i - mean(R)                              Dr. GRPO (no std normalisation)
    rloo   : A_i =  R_i - mean_{j != i} R_j                     Ahmadian et al. 2024
    reinforce++          : A_i,t = whiten_batch(G_i,t), G_i,t = R_i - beta sum_{s>=t} KL_i,s   Hu 2025
                           (the token-level KL in the reward with grpo.kl_in_reward, else G = R_i)
    reinforce++-baseline : A_i = whiten_batch(R_i - mean(R))     the group mean first, then the batch
    gae    : A_i,t = sum_l (gamma lam)^l delta_i,t+l, delta_t = r_t + gamma V_t+1 - V_t   PPO with a critic
             (Schulman 2016; Open-Reasoner-Zero): r_t the reward R_i at the last token (- beta KL_t per token with
             grpo.kl_in_reward), V the critic's values; returns A + V train the critic; whitened with critic.whiten
    whiten_batch: (x - mean) / (std + eps) over every completion token of the whole step, all ranks together
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


@ADVANTAGES.register("reinforce++")
def reinforce_pp_advantage(r: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE++: no baseline inside the group; the batch normalisation (whiten_batch) replaces it."""
    return r.clone()


@ADVANTAGES.register("reinforce++-baseline")
def reinforce_pp_baseline_advantage(r: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE++-baseline: the group mean subtracted first; the batch normalisation (whiten_batch) follows."""
    return r - r.mean(-1, keepdim=True)


# normalised over the whole batch after the group step (r1cli.rl.loop.add_advantages calls whiten_batch)
reinforce_pp_advantage.batch_whitened = reinforce_pp_baseline_advantage.batch_whitened = True
reinforce_pp_advantage.token_kl_returns = True  # grpo.kl_in_reward enters as a per-token return


@ADVANTAGES.register("gae")
def gae_rewards(r: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO with a learned critic: no group step (a group of one is fine); r1cli.rl.loop.add_advantages runs gae() over
    the critic's values."""
    return r.clone()


gae_rewards.needs_critic = True  # a value model beside the policy (the critic section), and rollout.n >= 1
gae_rewards.token_kl_returns = True  # grpo.kl_in_reward enters as a reward per token


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's action tokens (mask [S, C] 1; tokens a tool wrote, 0, are
    stepped over: the next action's value follows the last), the value after a row's last action 0 (the episode
    ends). token_rewards, values: [S, C]. Returns (advantages, returns = advantages + values), 0 off the mask."""
    r, v, m = token_rewards.double(), values.double(), mask.bool()
    adv = torch.zeros_like(r)
    last = torch.zeros(r.shape[0], dtype=r.dtype)  # A of the next action token
    next_v = torch.zeros(r.shape[0], dtype=r.dtype)  # V of the next action token (0 past the end)
    for t in range(r.shape[1] - 1, -1, -1):
        here = m[:, t]
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
        adv[:, t] = torch.where(here, a, 0.0)
        last = torch.where(here, a, last)
        next_v = torch.where(here, v[:, t], next_v)
    ret = (adv + v) * m
    return adv.to(values.dtype), ret.to(values.dtype)


def final_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[S, C] each sample's reward at its last action token (mask 1), 0 elsewhere."""
    m = mask.bool()
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & m  # the last 1 of each row
    return rewards.unsqueeze(-1).to(torch.float32) * last


def whiten_batch(adv: torch.Tensor, mask: torch.Tensor, eps: float, gather=lambda x: [x]) -> torch.Tensor:
    """(A - mean) / (std + eps) with the mean and the unbiased std over every token of `mask` [S, C] on every rank:
    `gather(local)` returns every data-parallel rank's local value (the whole step's statistics, not a rank's or a
    group's). adv: [S] (one per sample, counted once per token) or [S, C]."""
    grid = adv.double().unsqueeze(-1).expand(mask.shape) if adv.dim() == 1 else adv.double()
    m = mask.double()
    local = (float(m.sum()), float((grid * m).sum()), float((grid * grid * m).sum()))
    n, s1, s2 = (sum(part[i] for part in gather(local)) for i in range(3))
    mean = s1 / max(n, 1.0)
    var = max(s2 - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return ((adv.double() - mean) / (var ** 0.5 + eps)).to(adv.dtype)


def token_returns(rewards: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """[S, C] G_t = R - beta * sum_{s >= t} KL_s over each sample's completion tokens (0 on padding)."""
    future = (kl * mask).flip(-1).cumsum(-1).flip(-1)
    return (rewards.unsqueeze(-1) - beta * future) * mask


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
