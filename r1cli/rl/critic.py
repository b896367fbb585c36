"""PPO's learned critic (grpo.advantage=gae): its value loss, and the policy and critic saved as one checkpoint.

The critic is a second torch trainer (r1cli.interfaces.build_critic) holding a copy of a causal LM with a value head
(r1cli.models.value_head). Per step, after the rollout: old values V_old = critic.values(batch); GAE over the
token rewards gives advantages and returns (r1cli.rl.advantages.gae); then each mini-batch takes one policy step and
one critic step on the clipped value loss

    L_V = 1/N sum_t 0.5 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - G_t)^2)

over the N completion tokens of the global mini-batch (every rank together), c = critic.value_clip.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1cli.interfaces import LossInput
from r1cli.models.value_head import values_at


def value_loss_terms(v: torch.Tensor, old: torch.Tensor, returns: torch.Tensor,
                     clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (0.5 max((V - G)^2, (V_clipped - G)^2), whether the clipped term was the larger); clip 0: none."""
    plain = (v - returns) ** 2
    if not clip:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    clipped = (old + (v - old).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


class ValueLoss:
    """The critic's TokenLoss: hidden states in (the trainer's HIDDEN door), the value head applied here. Batch fields:
    old_values, returns, value_mask [B, C]; `num_tokens`: the global mini-batch's value_mask sum."""

    inputs = (LossInput.HIDDEN,)
    temperature = 1.0
    wants_entropy = False

    def __init__(self, clip: float, num_tokens: float):
        self.clip, self.num_tokens = clip, num_tokens

    def from_hidden(self, hidden, weight, batch, targets, inputs):
        present = batch.scored_mask().bool()
        dev = hidden.device
        f = {k: batch.fields[k][present].to(dev).float() for k in ("old_values", "returns", "value_mask")}
        v = values_at(hidden, weight)
        per_tok, clipped = value_loss_terms(v, f["old_values"], f["returns"], self.clip)
        m = f["value_mask"]
        value = (per_tok * m).sum() / self.num_tokens
        vd = v.detach().double()
        ret = f["returns"].double()
        md = m.double()
        return value, {"loss": value.detach().double(), "tokens": md.sum(), "clipped": (clipped * m).sum().double(),
                       "v": (vd * md).sum(), "err": ((ret - vd) * md).sum(), "err2": ((ret - vd) ** 2 * md).sum(),
                       "ret": (ret * md).sum(), "ret2": (ret * ret * md).sum()}

    def __call__(self, logp, entropy, batch):
        raise RuntimeError("ValueLoss takes hidden states (inputs = HIDDEN): the trainer calls from_hidden")

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["tokens"])
        var = lambda s1, s2: max(s2 / n - (s1 / n) ** 2, 0.0)  # noqa: E731  a token-weighted variance
        ret_var = var(sums["ret"], sums["ret2"])
        return {"critic/value_loss": sums["loss"], "critic/values": sums["v"] / n,
                "critic/returns": sums["ret"] / n, "critic/clip_frac": sums["clipped"] / n,
                # 1 - Var(G - V) / Var(G): the share of the returns' variance the values explain (before this update)
                "critic/explained_var": 1.0 - var(sums["err"], sums["err2"]) / ret_var if ret_var > 0 else 0.0}


class WithCritic:
    """The policy's trainer with the critic beside it: what the run harness saves and resumes is both (the critic's
    files named critic_* in the same checkpoint folder); everything else is the policy's."""

    def __init__(self, policy, critic):
        self.policy, self.critic = policy, critic

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def save(self, directory: Path, extra: dict) -> None:
        self.policy.save(directory, extra)
        self.critic.save(directory, extra)

    def load(self, directory: Path) -> dict:
        if not (Path(directory) / "critic_trainer.pt").is_file():
            from r1cli.errors import R1Error

            raise R1Error(f"{directory} holds no critic (critic_model.safetensors, critic_trainer.pt): it was written "
                          "by a run without grpo.advantage=gae; resume with that run's settings")
        self.critic.load(directory)
        return self.policy.load(directory)  # last: the policy's generator states are the ones restored
