"""The GRPO objective as one frozen spec, built once from the config and handed to kernels and backends.

A backend computes log-probs (from logits, hidden states or vocabulary shards) and
applies the spec; it does not know which GRPO variants exist. The variant switches
(clip bounds, dual clip, KL estimator and weight, entropy bonus, token or sequence
ratio, aggregation) are all read here, and the maths they select lives in losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1cli.config import GRPOConfig
from r1cli.errors import R1Error
from r1cli.interfaces import LossInput
from r1cli.kernels.records import TokenRecord
from r1cli.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    aggregate,
    aggregation_weights,
    kl_penalty,
)
from r1cli.rl.mismatch import mismatch_terms


@dataclass(frozen=True)
class GRPOObjective:
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 0.0  # c > 1: for A < 0 the loss is capped at -c A
    beta: float = 0.0  # KL weight in the loss (0 when the KL is a reward penalty instead)
    kl: str = "k3"  # KL estimator
    entropy_coef: float = 0.0
    ratio_level: str = "token"  # "sequence": GSPO
    loss_agg: str = "seq-mean-token-mean"
    max_len: int = 0  # Dr. GRPO's constant normaliser: the generation budget
    temperature: float = 1.0  # log-probs are of the sampling distribution
    clamp: float = 20.0  # |log-ratio| bound before exp
    policy_loss: str = "ppo"  # ppo: the clipped surrogate; cispo: the clipped, detached weight times log p

    def __post_init__(self):
        KL_ESTIMATORS.check(self.kl, "grpo.kl_estimator")
        RATIO_LEVELS.check(self.ratio_level, "grpo.ratio_level")
        AGGREGATIONS.check(self.loss_agg, "grpo.loss_agg")
        POLICY_LOSSES.check(self.policy_loss, "grpo.policy_loss")
        if self.policy_loss == "cispo" and (self.dual_clip or self.ratio_level != "token"):
            raise R1Error("grpo.policy_loss=cispo clips a token-level importance weight and keeps every token's "
                          "gradient: it takes no grpo.dual_clip and no grpo.ratio_level=sequence")

    @classmethod
    def from_config(cls, g: GRPOConfig, temperature: float, max_len: int) -> "GRPOObjective":
        return cls(eps_low=g.eps_low, eps_high=g.eps_high, dual_clip=g.dual_clip,
                   beta=0.0 if g.kl_in_reward else g.beta, kl=g.kl_estimator, entropy_coef=g.entropy_coef,
                   ratio_level=g.ratio_level, loss_agg=g.loss_agg, max_len=max_len, temperature=temperature,
                   clamp=g.log_ratio_clamp, policy_loss=g.policy_loss)

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0

    @property
    def elementwise(self) -> bool:
        """True when each token's loss depends on that token alone (token-level ratios): then a fused kernel
        may apply it to any chunk of tokens. Sequence-level ratios need whole [B, T] rows."""
        return self.ratio_level == "token"

    def per_token(self, logp: torch.Tensor, entropy: torch.Tensor | None, old_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor):
        """Per-token loss (zero where mask is 0) and a TokenRecord.

        Token level: any shape, advantages per token or [B] for [B, T]. Sequence level: [B, T] rows."""
        if not self.elementwise and logp.dim() != 2:
            raise ValueError("sequence-level ratios need [B, T] rows, not flat tokens")
        adv = advantages.float()
        if adv.shape != logp.shape:
            adv = adv.unsqueeze(-1).expand_as(logp)
        log_ratio = RATIO_LEVELS.get(self.ratio_level)(logp, old_logp.float(), mask)
        pg, clipped = POLICY_LOSSES.get(self.policy_loss)(log_ratio, adv, self.eps_low, self.eps_high, self.dual_clip,
                                                          self.clamp)
        if self.beta > 0 and ref_logp is not None:
            kl_t = kl_penalty(logp, ref_logp.float(), self.kl, self.clamp)
        else:
            kl_t = torch.zeros_like(logp)
        loss = pg + self.beta * kl_t
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy
        m = mask.float()
        rec = TokenRecord(logp.detach(), (kl_t * m).detach(), (clipped * m).detach(),
                          None if entropy is None else entropy.detach())
        return loss * m, rec

    def chunked(self, old_logp, ref_logp, advantages, mask):
        """per_token for tokens a..b of flat [N] inputs, as a fused one-pass kernel calls it chunk by chunk."""
        def per_token(logp, entropy, a, b):
            return self.per_token(logp, entropy, old_logp[a:b], None if ref_logp is None else ref_logp[a:b],
                                  advantages[a:b], mask[a:b])

        return per_token

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, num_seqs: float | None = None,
                  num_tokens: float | None = None) -> torch.Tensor:
        """[B, T] per-token loss -> scalar; num_seqs / num_tokens: the global batch's, when it is split."""
        return aggregate(per_token, mask, self.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens,
                         max_len=self.max_len or None)

    def token_weights(self, mask: torch.Tensor, num_seqs: float | None = None,
                      num_tokens: float | None = None) -> torch.Tensor:
        """[B, T] w with aggregate(x) == (w * x).sum(): the aggregation known before the forward."""
        return aggregation_weights(mask, self.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens,
                                   max_len=self.max_len or None)


def _per_token(advantages: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Advantages [B] (one per sequence) or [B, C] (per token, e.g. importance-weighted) as a [B, C] grid."""
    return advantages.unsqueeze(-1).expand_as(present) if advantages.dim() == 1 else advantages


class GRPOLoss:
    """The trainer-facing loss of one GRPO optimizer step (r1cli.interfaces.TokenLoss).

    Bound to the spec and to the global mini-batch's sequence and token counts, so that
    every micro-batch on every rank contributes its exact share of the one global loss.
    Rows carry fields advantages [B] (or [B, C] per token), mask [B, C] (the completion mask times the row's
    loss weight), old_logp [B, C] and, with a reference, ref_logp [B, C]. Without old_logp the update is on-policy:
    the old log-probs are this forward's own, detached (ratio exactly 1, the same gradient), and an engine_logp
    field [B, C] then gives the engine/trainer mismatch sums from this forward.
    """

    wants_entropy = True  # measured for the logs even without an entropy bonus
    # the batch fields it reads (r1cli.rl.loop.add_logprobs / add_advantages write them); ref_logp only with a KL
    # term; old_logp unless on-policy
    reads = ("advantages", "mask")

    def __init__(self, objective: GRPOObjective, num_seqs: float, num_tokens: float):
        self.objective, self.num_seqs, self.num_tokens = objective, num_seqs, num_tokens
        self.temperature = objective.temperature
        # sequence-level ratios need whole rows: no per-token weights known before the forward
        self.inputs = (LossInput.LOGPROBS, LossInput.WEIGHTED_TERMS) if objective.elementwise else (LossInput.LOGPROBS,)

    def _flat(self, batch, device):
        """The rows' fields as flat vectors over their scored tokens, on `device`."""
        f = batch.fields
        missing = [k for k in self.reads if k not in f]
        if missing:
            raise KeyError(f"GRPOLoss reads batch fields {', '.join(self.reads)}; this batch lacks "
                           f"{', '.join(missing)}")
        present = batch.scored_mask().bool()
        flat = lambda x: x[present].to(device)  # noqa: E731  grid [b, C] -> tokens [N]
        return present, dict(old=flat(f["old_logp"]) if "old_logp" in f else None,
                             ref=None if "ref_logp" not in f else flat(f["ref_logp"]),
                             adv=flat(_per_token(f["advantages"], present).float()),
                             mask=flat(f["mask"]))

    def _sums(self, value, rec, mask) -> dict[str, torch.Tensor]:
        """Metric sums as float64 tensors on the compute device: the trainer adds them over micro-batches and reads
        them once per step (a float() here would stall the GPU five times per micro-batch)."""
        m = mask.float()
        zero = torch.zeros((), dtype=torch.float64, device=m.device)
        return {"loss": value.detach().double(), "kl": (rec.kl.float() * m).sum().double(),
                "clipped": (rec.clipped.float() * m).sum().double(), "tokens": m.sum().double(),
                "entropy": zero if rec.entropy is None else (rec.entropy.float() * m).sum().double()}

    def __call__(self, logp, entropy, batch):
        obj, dev = self.objective, logp.device
        present, t = self._flat(batch, dev)
        on_policy = t["old"] is None
        if on_policy:
            t["old"] = logp.detach()
        mask_grid = batch.fields["mask"].to(dev)
        if obj.elementwise:
            per_tok, rec = obj.per_token(logp, entropy, t["old"], t["ref"], t["adv"], t["mask"])
            grid = torch.zeros(present.shape, dtype=per_tok.dtype, device=dev).masked_scatter(present.to(dev),
                                                                                               per_tok)
        else:  # sequence-level ratios need whole rows
            p = present.to(dev)
            to_grid = lambda x: torch.zeros(present.shape, dtype=x.dtype, device=dev).masked_scatter(p, x)  # noqa
            f = batch.fields
            grid, rec = obj.per_token(to_grid(logp), None if entropy is None else to_grid(entropy),
                                      to_grid(t["old"]), None if "ref_logp" not in f else f["ref_logp"].to(dev),
                                      f["advantages"].to(dev), mask_grid)
            rec = TokenRecord(logp.detach(), rec.kl[p], rec.clipped[p], None if entropy is None else entropy.detach())
        value = obj.aggregate(grid, mask_grid, self.num_seqs, self.num_tokens)
        sums = self._sums(value, rec, t["mask"])
        if on_policy and "engine_logp" in batch.fields:  # the mismatch from this forward (no earlier pass had it)
            engine = batch.fields["engine_logp"][present].to(dev)
            terms = mismatch_terms(logp.detach(), engine, torch.ones_like(engine))
            sums.update({f"mismatch_{k}": v for k, v in terms.items()})
        return value, sums

    def weighted_terms(self, batch, device, tokens: slice = slice(None)):
        """(token weights, per-token loss of tokens a..b, sums) over the scored tokens `tokens` of the batch, for a
        one-pass fused kernel (elementwise objectives only: see `inputs`)."""
        present, t = self._flat(batch, device)
        if t["old"] is None:
            raise ValueError("a one-pass fused loss needs the old policy's log-probs (batch field old_logp)")
        t = {k: None if v is None else v[tokens] for k, v in t.items()}
        w = self.objective.token_weights(batch.fields["mask"], self.num_seqs, self.num_tokens)
        per_token = self.objective.chunked(t["old"], t["ref"], t["adv"], t["mask"])
        return w[present][tokens].to(device), per_token, lambda value, rec: self._sums(value, rec, t["mask"])

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        tok = max(1.0, sums["tokens"])
        out = {"loss": sums["loss"], "kl": sums["kl"] / tok, "clip_frac": sums["clipped"] / tok,
               "entropy": sums["entropy"] / tok}
        if "mismatch_sum" in sums:
            out["rollout/mismatch_kl"] = sums["mismatch_sum"] / max(1.0, sums["mismatch_count"])
            out["rollout/mismatch_kl_max"] = sums["mismatch_max"]
        return out
