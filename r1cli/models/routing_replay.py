"""MoE routing replay (R3, model.routing_replay): the experts each token was routed to at generation time, recorded
by the rollout engine, and the trainer's forward routed through the same experts.

In RL on a mixture of experts the trainer and the engine route some tokens to different experts (other kernels,
batch shapes, a KV cache against a full forward; near-ties flip): the largest source of their log-prob mismatch.
Replayed, the trainer takes the engine's experts and weighs them by its own router's probabilities, renormalised
over those experts as the model does (the router still learns through them).

One RoutingHooks per model (`routing_hooks(model)`), forward hooks on its transformers top-k routers (Qwen3-MoE,
Mixtral: softmax, top-k), in layer order:

    record()            each router call's expert indices [N, k] are kept (the engine's generate)
    replay(grid, swap)  grid [N, layers, k] (-1 where nothing was recorded, e.g. padding): the share of recorded
                        token-layers whose own top-k set equals the recorded one is counted (agreement); with swap
                        the recorded experts replace the router's own choice
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from r1cli.errors import R1Error

MODES = ("off", "record", "replay")


def routers(model) -> list:
    """The model's top-k router modules, in layer order."""
    return [m for _, m in model.named_modules() if type(m).__name__.lower().endswith("topkrouter")]


class RoutingHooks:
    def __init__(self, model):
        self.routers = routers(model)
        if any(hasattr(m, "e_score_correction_bias") for m in self.routers):
            raise R1Error("model.routing_replay is built for softmax top-k routers (Qwen3-MoE, Mixtral); DeepSeek-V3's "
                          "grouped sigmoid router with its expert bias is not replayed yet: set "
                          "model.routing_replay=off")
        self.calls: list[list[torch.Tensor]] | None = None  # recording: per router, each call's [N, k]
        self.grid: torch.Tensor | None = None  # replaying: [N, layers, k]
        self.swap = False
        self.agree = self.total = 0.0
        for layer, m in enumerate(self.routers):
            m.register_forward_hook(lambda mod, args, out, _l=layer: self._hook(mod, out, _l), prepend=True)

    def _hook(self, module, out, layer: int):
        logits, scores, own = out
        if self.calls is not None:
            self.calls[layer].append(own.detach().to("cpu", torch.int16))
            return None
        if self.grid is None:
            return None
        rec = self.grid[:, layer].to(own.device)
        if rec.shape != own.shape:
            raise RuntimeError(f"routing replay: {rec.shape[0]} recorded tokens for a router call of {own.shape[0]}")
        known = (rec >= 0).all(-1)
        with torch.no_grad():
            same = (rec.long().sort(-1).values == own.sort(-1).values).all(-1)
            self.agree += float((same & known).sum())
            self.total += float(known.sum())
        if not self.swap:
            return None
        idx = torch.where(known[:, None], rec.long(), own)
        probs = torch.softmax(logits.float(), -1).gather(-1, idx)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen3-MoE by its config
            probs = probs / probs.sum(-1, keepdim=True)
        return logits, probs.to(scores.dtype), idx

    @contextmanager
    def record(self):
        """Inside: every router call's experts kept; `self.calls` holds them after."""
        self.calls = [[] for _ in self.routers]
        try:
            yield self
        finally:
            self.recorded, self.calls = self.calls, None

    @contextmanager
    def replay(self, grid: torch.Tensor | None, swap: bool):
        """Inside: router calls of grid.shape[0] tokens checked against (swap: routed by) the recorded experts."""
        self.grid, self.swap = grid, swap
        try:
            yield self
        finally:
            self.grid, self.swap = None, False

    def take_agreement(self) -> float | None:
        """The share of recorded token-layers whose routing the model chose itself, since the last call."""
        share = self.agree / self.total if self.total else None
        self.agree = self.total = 0.0
        return share


def routing_hooks(model) -> RoutingHooks | None:
    """The model's RoutingHooks (made once, shared by an engine and a trainer holding the same module); None
    without routers."""
    hooks = getattr(model, "_r1_routing_hooks", None)
    if hooks is None and routers(model):
        hooks = RoutingHooks(model)
        model._r1_routing_hooks = hooks
    return hooks


def padded(rows, length: int) -> torch.Tensor:
    """An engine's routing rows ([positions, layers, k]: every position but the last, as vLLM returns them) as
    [length, layers, k] int16, -1 past what was recorded."""
    t = torch.as_tensor(rows).to(torch.int16)
    if t.shape[0] > length:
        raise ValueError(f"{t.shape[0]} routing rows for a sequence of {length} tokens")
    return torch.cat([t, t.new_full((length - t.shape[0], *t.shape[1:]), -1)])


def per_sequence(recorded: list[list[torch.Tensor]], rows: int, starts: list[int],
                 lengths: list[int]) -> list[torch.Tensor]:
    """A generate call's router calls (per layer: the prefill's [rows * width, k], then one [rows, k] per decode
    step) as each row's [length, layers, k]: its positions from `starts[r]` (after its left padding) on; positions
    never fed to the model (a row's last token) are -1."""
    layers = [torch.cat([c.view(rows, -1, c.shape[-1]) for c in calls], 1) for calls in recorded]
    grid = torch.stack(layers, 2)  # [rows, positions, layers, k]
    return [padded(grid[r, s: s + n], n) for r, (s, n) in enumerate(zip(starts, lengths))]
