"""Logit distillation through the trainer door: the student's hidden states and lm_head weight against a frozen
teacher's, for the same tokens (r1cli.kernels.ops.fused_linear_distill)."""

from __future__ import annotations

from dataclasses import replace

from r1cli.config import Config, DistillConfig
from r1cli.errors import R1Error
from r1cli.interfaces import LossInput


def load_teacher(cfg: Config, trainer):
    """The teacher beside the student, frozen (the trainer's frozen_copy: the compute dtype, sharded like the
    student under FSDP), as a HiddenLoss module; its tokenizer must be the student's."""
    from r1cli.models.loading import load_tokenizer

    vocab = load_tokenizer(cfg.distill.teacher).get_vocab()
    if vocab != trainer.tokenizer.get_vocab():
        raise R1Error(f"distill.teacher {cfg.distill.teacher} has another tokenizer than the student "
                      f"{cfg.model.path}: logit distillation compares distributions over the same tokens; "
                      "drop distill.teacher to train on the teacher's samples alone")
    if not hasattr(trainer, "frozen_copy"):
        raise R1Error(f"logit distillation (distill.teacher) needs parallel.backend=torch, not "
                      f"{cfg.parallel.backend}")
    return trainer.frozen_copy(replace(cfg.model, path=cfg.distill.teacher))[1]


def _hidden_and_weight(hidden, weight):
    return hidden, weight


def _hidden_and_weight_copy(hidden, weight):
    """Under FSDP the gathered lm_head weight is freed again when the teacher's forward returns: keep a copy."""
    return hidden, weight.detach().clone()


class DistillLoss:
    """(1 - w) NLL + w T^2 KL per token, averaged over the global batch's tokens (r1cli.interfaces.TokenLoss
    with `from_hidden`: the trainer hands over hidden states instead of log-probs)."""

    temperature = 1.0
    wants_entropy = False
    inputs = (LossInput.HIDDEN,)

    def __init__(self, teacher, num_tokens: float, cfg: DistillConfig, pad_id: int):
        from torch.distributed.tensor import DTensor

        self.teacher, self.cfg, self.pad_id = teacher, cfg, pad_id
        self.num_tokens = max(1.0, num_tokens)
        sharded = isinstance(teacher.model.lm_head.weight, DTensor)  # FSDP: gathered only inside its forward
        self._grab = _hidden_and_weight_copy if sharded else _hidden_and_weight

    def from_hidden(self, hidden, weight, batch, targets, inputs):
        """`inputs`: the (input ids, positions, scored indices) of the student's forward, which the teacher takes
        too - the same rows, packed or split over context-parallel ranks as the student's are."""
        import torch

        from r1cli.kernels import ops as kernels

        ids, pos, idx = inputs
        with torch.no_grad():
            th, tw = self.teacher(ids, pos, idx, self._grab)
        d = self.cfg
        weights = torch.full((hidden.shape[0],), 1.0 / self.num_tokens, device=hidden.device)
        loss, kl, nll = kernels.fused_linear_distill(hidden, weight, th, tw, targets, weights,
                                                     alpha=d.kl_weight, direction=d.kl_direction,
                                                     temperature=d.temperature, chunk=d.chunk_tokens)
        return loss, {"kl": kl.detach().double(), "nll": nll.detach().double()}

    def __call__(self, logp, entropy, batch):
        raise RuntimeError("DistillLoss takes hidden states (inputs = HIDDEN): the trainer calls from_hidden")

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        d, n = self.cfg, self.num_tokens
        kl, nll = sums["kl"] / n, sums["nll"] / n
        return {"loss": d.kl_weight * d.temperature ** 2 * kl + (1 - d.kl_weight) * nll, "kl": kl, "nll": nll}
