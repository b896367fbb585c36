"""How a mixture of experts routed its tokens during a train step: load per expert, imbalance, the balance term.

Each backend hooks its routers (transformers' TopKRouter modules, megatron-core's TopKRouter) and adds, per MoE
layer, the tokens each expert received and the summed router probabilities; `metrics` reduces them over the
data-parallel ranks (each routes its own tokens) into the figures a user watches:

    moe/load_imbalance   max over layers of (most-loaded expert's tokens / mean tokens per expert); 1 = even
    moe/load_min_share   min over layers of (least-loaded expert's tokens / mean); 0 = an expert got nothing
    moe/balance          mean over layers of E * sum_i f_i * P_i (f_i: expert i's share of the routed
                         assignments, P_i: its mean router probability) - the Switch/GShard load-balancing term
                         before its coefficient: 1 when balanced, up to E when one expert takes all

Routing is dropless (no capacity factor): no token is dropped, so there is no dropped-token figure to report.
`mask` (the torch backend sets it per micro-batch) leaves padding positions out; megatron's routers count them.
"""

from __future__ import annotations

import torch


class RouterStats:
    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}  # layer -> tokens per expert
        self.probs: dict[str, torch.Tensor] = {}  # layer -> summed router probabilities per expert
        self.tokens: dict[str, float] = {}
        self.active = False
        self.mask: torch.Tensor | None = None  # [tokens] True for real tokens of the forward that runs
        self.gate_logits: list[torch.Tensor] | None = None  # when a list: each router's logits, autograd intact

    def add(self, layer: str, experts_of_token: torch.Tensor, logits: torch.Tensor, score: str = "softmax") -> None:
        """experts_of_token: [tokens, k] expert indices (or a [tokens, E] routing map); logits [tokens, E]; score:
        the router's score function (DeepSeek-V3's "sigmoid" scores count normalised to sum 1 per token, as its
        sequence-wise balance loss takes them)."""
        if self.gate_logits is not None:
            self.gate_logits.append(logits)
        if not self.active:
            return
        with torch.no_grad():
            n = logits.shape[-1]
            logits = logits.reshape(-1, n).float()
            experts_of_token = experts_of_token.reshape(logits.shape[0], -1)
            if self.mask is not None and self.mask.numel() == logits.shape[0]:
                keep = self.mask.to(logits.device)
                logits, experts_of_token = logits[keep], experts_of_token[keep]
            if experts_of_token.dtype == torch.bool:
                counts = experts_of_token.reshape(-1, n).sum(0).double().cpu()
            else:
                counts = torch.bincount(experts_of_token.reshape(-1).cpu(), minlength=n).double()
            if score == "sigmoid":
                scores = torch.sigmoid(logits)
                probs = (scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)).sum(0).double().cpu()
            else:
                probs = torch.softmax(logits, -1).sum(0).double().cpu()
        self.counts[layer] = self.counts.get(layer, 0) + counts
        self.probs[layer] = self.probs.get(layer, 0) + probs
        self.tokens[layer] = self.tokens.get(layer, 0.0) + logits.shape[0]

    def start(self) -> None:
        self.counts, self.probs, self.tokens, self.active = {}, {}, {}, True

    def metrics(self, all_reduce_sum=None) -> dict:
        """The step's figures (over every data-parallel rank when all_reduce_sum sums a tensor across them); {}
        when no router ran."""
        self.active = False
        if not self.counts:
            return {}
        layers = sorted(self.counts)
        counts = torch.stack([self.counts[k] for k in layers])
        probs = torch.stack([self.probs[k] for k in layers])
        tokens = torch.tensor([self.tokens[k] for k in layers], dtype=torch.float64)
        self.counts, self.probs, self.tokens = {}, {}, {}
        if all_reduce_sum is not None:
            counts, probs, tokens = (all_reduce_sum(t) for t in (counts, probs, tokens))
        mean = counts.mean(1).clamp_min(1e-12)
        f = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)
        p = probs / tokens[:, None].clamp_min(1e-12)
        n = counts.shape[1]
        return {"moe/load_imbalance": float((counts.max(1).values / mean).max()),
                "moe/load_min_share": float((counts.min(1).values / mean).min()),
                "moe/balance": float((n * (f * p).sum(1)).mean())}


def hook_transformers_routers(model, stats: RouterStats) -> int:
    """Forward hooks on transformers' top-k routers (Qwen3-MoE, Mixtral, DeepSeek-V3 - whose sigmoid router carries
    the expert bias: (logits, weights, indices)); the number hooked."""
    hooked = 0
    for name, module in model.named_modules():
        if type(module).__name__.lower().endswith("topkrouter"):
            score = "sigmoid" if hasattr(module, "e_score_correction_bias") else "softmax"
            module.register_forward_hook(lambda m, args, out, _n=name, _s=score: stats.add(_n, out[2], out[0], _s))
            hooked += 1
    return hooked


def load_balancing(model):
    """`(gate_logits, real_tokens) -> (coefficient, loss)` with transformers' own load-balancing loss of the model's
    family (Switch style, over every layer's router logits, padding left out) at its config's router_aux_loss_coef;
    None when the family has none or the coefficient is 0 (DeepSeek-V3 balances by its expert bias instead)."""
    import sys

    config = getattr(model, "config", None)
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    loss = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not coef or loss is None or not experts:
        return None
    top_k = config.num_experts_per_tok

    def balance(gate_logits: list[torch.Tensor], real: torch.Tensor):
        return coef, loss(tuple(g.float() for g in gate_logits), experts, top_k, real)

    return balance
