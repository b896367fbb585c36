"""SFT's loss through the trainer door: the mean NLL over every target token of the global batch."""

from __future__ import annotations

from r1cli.interfaces import LossInput


class NLLLoss:
    """Bound to the global batch's target count, so one process with grad_accum=2 and two processes with
    grad_accum=1 give the same gradient (r1cli.interfaces.TokenLoss)."""

    temperature = 1.0
    wants_entropy = False
    inputs = (LossInput.LOGPROBS, LossInput.WEIGHTED_TERMS)

    def __init__(self, num_tokens: float):
        self.num_tokens = max(1.0, num_tokens)
        self.scale = 1.0 / self.num_tokens

    def __call__(self, logp, entropy, batch):
        nll = -logp.sum()
        return nll * self.scale, {"nll": nll.detach().double()}  # read once per step, not per micro-batch

    def weighted_terms(self, batch, device, tokens: slice = slice(None)):
        """Every token weighs 1 / global tokens: the one-pass kernel applies (to the scored tokens `tokens`)."""
        import torch

        from r1cli.kernels.records import TokenRecord

        n = len(range(sum(batch.counts))[tokens])
        zero = torch.zeros(n, device=device)

        def per_token(logp, ent, a, b):
            return -logp, TokenRecord(logp.detach(), zero[a:b], zero[a:b], None)

        return (torch.full((n,), self.scale, device=device), per_token,
                lambda value, rec: {"nll": -rec.logp.float().sum().double()})

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["nll"] / self.num_tokens}
