"""grpo: the RL objective (GRPO and its variants), advantages, KL and corrections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1cli.config.fields import bounded, named


@dataclass
class GRPOConfig:
    prompts_per_step: int = bounded(32, 1)  # global, across ranks
    mu: int = bounded(1, 1)  # optimisation passes over each rollout batch
    mini_batch_size: int = bounded(0, 0)  # sequences per optimizer step; 0: the whole batch
    # the old policy's log-probs: auto leaves out their no-grad forward when the step's one update is on-policy
    # (mu 1, one mini-batch, no TIS, no KL in the reward, no one-pass kernel): the ratio is then exactly 1 and
    # the gradient the same; recompute always runs it
    old_logprobs: Literal["auto", "recompute"] = "auto"
    # ppo: the clipped surrogate (GRPO, DAPO); cispo: the importance weight clipped and detached times the log-prob
    # (MiniMax-M1), so no token's gradient is dropped by the clip
    policy_loss: str = named("ppo", "r1cli.rl.losses:POLICY_LOSSES")
    eps_low: float = bounded(0.2, 0.0)  # PPO clip below: the ratio is clipped at 1 - eps_low
    eps_high: float = bounded(0.2, 0.0)  # PPO clip above, 1 + eps_high (DAPO's clip-higher: eps_high > eps_low)
    dual_clip: float = bounded(0.0, 0.0)  # c > 1 enables dual clip for negative advantages; 0: off
    ratio_level: str = named("token", "r1cli.rl.losses:RATIO_LEVELS")  # sequence: GSPO
    # seq-mean-token-mean (paper), token-mean (DAPO), seq-mean-token-sum-norm (Dr. GRPO)
    loss_agg: str = named("seq-mean-token-mean", "r1cli.rl.losses:AGGREGATIONS")
    # grpo, drgrpo, rloo, reinforce++, reinforce++-baseline (group or batch baselines); gae: PPO's learned critic
    advantage: str = named("grpo", "r1cli.rl.advantages:ADVANTAGES")
    adv_eps: float = bounded(1e-6, 0.0)  # added to the group std before dividing
    beta: float = bounded(0.001, 0.0)  # KL weight; 0 loads no reference model
    kl_estimator: str = named("k3", "r1cli.rl.losses:KL_ESTIMATORS")  # k1, k2, k3
    kl_in_reward: bool = False  # the KL penalty subtracted from the reward per token instead of added to the loss
    ref_update_every: int = bounded(0, 0)  # refresh the reference from the policy every N steps; 0: never
    drop_equal_groups: bool = False  # dynamic sampling: groups whose rewards are all equal carry no signal
    # DAPO dynamic sampling: groups whose rewards are all equal are replaced by groups of further prompts, drawn in
    # rounds of prompts_per_step from their own seeded stream, until the step holds prompts_per_step groups with
    # signal or max_sampling_rounds rounds were generated (then the rest are groups without signal, weighted 0)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = bounded(3, 1)  # dynamic_sampling: rounds of prompts generated at most per step
    overlong_buffer: int = bounded(0, 0)  # DAPO soft overlong penalty over the last N tokens; 0: off
    overlong_penalty: float = bounded(1.0, 0.0)  # the overlong buffer's largest penalty (at the length limit)
    overlong_filter: bool = False  # truncated samples take no part in the loss
    entropy_coef: float = bounded(0.0, 0.0)  # weight of an entropy bonus in the loss; 0: off
    # log-ratios are clamped to +-this before exp (a safety net against overflow)
    log_ratio_clamp: float = bounded(20.0, 0.0, above=True)
    max_bad_steps: int = bounded(3, 1)  # stop after this many non-finite steps in a row
