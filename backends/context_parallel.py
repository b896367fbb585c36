"""Context parallelism on the torch backend (parallel.context_parallel: N): one sequence's tokens split over N ranks,
DeepSpeed-Ulysses style (arXiv 2309.14509).

Under it a micro-batch is one packed row - its samples end to end, positions restarting at each - padded to a
multiple of N, and rank c holds the row's c-th contiguous slice through every layer: its embeddings, norms, MLPs and
the lm_head see only its own tokens. Attention alone needs the whole sequence: an all-to-all trades the sequence split
for a head split (each rank then holds every token of H/N heads), attention runs sample by sample with a causal
kernel (no [S x S] mask, no attention across samples), and a second all-to-all trades back. The backward of each
all-to-all is the opposite all-to-all, so gradients reach every rank's tokens.

The scored tokens of the packed row are in row order, so rank c's are one contiguous range [a_c, b_c) of the
micro-batch's scored tokens: a loss whose per-token weights are known before the forward (the one-pass fused terms,
distillation) is applied to that range alone and its value and metric sums are partial - summed over the N ranks once
at the end of the step; a loss that reads whole rows (log-probs, GSPO's sequence ratios) gets the log-probs of every
rank's range gathered (N floats per token; the backward keeps each rank's own range) and runs the same on every rank,
its sums counted once. Everything here runs on gloo too (`all_to_all_single` works there), which is how the CPU tests
hold CP=2 to CP=1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1cli.errors import R1Error

ATTENTION = "r1_ulysses"  # the attention implementation name the trainer's models are loaded with under CP
# families whose attention goes through transformers' attention interface with plain causal (or per-sample)
# attention; mixtures of experts are refused (their load-balancing term is a product of per-expert means over the
# tokens, which a rank's slice does not give), as are sliding windows
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def check_model(hf_config, n: int, where: str) -> None:
    """Refuse, before any weight loads, what context parallelism over `n` ranks cannot split."""
    family = hf_config.model_type
    if family not in FAMILIES:
        raise R1Error(f"parallel.context_parallel={n} splits the attention of {', '.join(FAMILIES)} models; {where} "
                      f"is a {family} model" + (" (a mixture of experts: its load-balancing loss needs every token "
                                                "of a sequence on one rank)" if "moe" in family or family in
                                               ("mixtral", "deepseek_v3") else ""))
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        raise R1Error(f"parallel.context_parallel={n}: {where} uses sliding-window attention, which the split "
                      "attention does not apply")
    heads = hf_config.num_attention_heads
    if heads < n:
        raise R1Error(f"parallel.context_parallel={n} splits the attention heads over {n} ranks: {where} has only "
                      f"{heads} query heads")


def head_counts(heads: int, n: int) -> list[int]:
    """Heads per rank: as even as can be (9 heads over 2 ranks: 5 and 4), in rank order."""
    return [heads // n + (1 if r < heads % n else 0) for r in range(n)]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0: `send[j]` rows go to rank j, `receive[j]` rows come from it; the backward is the
    exchange the other way."""

    @staticmethod
    def forward(ctx, x, send, receive, group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _exchange(x, send, receive, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    x = x.contiguous()  # the collective reads and writes storage in order: no permuted strides on either side
    out = torch.empty((sum(receive), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def heads_to_sequence(x: torch.Tensor, n: int, rank: int, group) -> torch.Tensor:
    """[B, H, S/n, D] (every head of this rank's tokens) -> [B, H_r, S, D] (this rank's heads, head_counts, of every
    token)."""
    b, h, s, d = x.shape
    counts = head_counts(h, n)
    mine = counts[rank]
    x = _AllToAll.apply(x.permute(1, 0, 2, 3), counts, [mine] * n, group)  # heads first: head group j to rank j
    return x.reshape(n, mine, b, s, d).permute(2, 1, 0, 3, 4).reshape(b, mine, n * s, d)  # rank j's tokens j-th


def sequence_to_heads(x: torch.Tensor, n: int, heads: int, group) -> torch.Tensor:
    """[B, H_r, S, D] -> [B, H, S/n, D]: the inverse of heads_to_sequence."""
    b, mine, s, d = x.shape
    x = x.reshape(b, mine, n, s // n, d).permute(2, 1, 0, 3, 4).reshape(n * mine, b, s // n, d)  # token chunk j
    x = _AllToAll.apply(x, [mine] * n, head_counts(heads, n), group)  # rank j's heads of my tokens, in head order
    return x.permute(1, 0, 2, 3)


@dataclass
class Layout:
    """One micro-batch's packed row as the ranks hold it: the whole row's sample spans (for attention) and this
    rank's range [first, first + count) of the row's scored tokens."""

    spans: list[list[tuple[int, int]]]  # per row of the forward: (start, end) of each sample in the whole row
    first: int
    count: int
    counts: list[int]  # every rank's scored-token count, in rank order


class ContextParallel:
    """The group of ranks that share one sequence, the slicing of a packed row, and the attention between them."""

    def __init__(self, size: int, rank: int, group, place):
        self.size, self.rank, self.group = size, rank, group
        self.place = place  # a tensor onto the device the group's collectives read (DistributedContext)
        self._state = threading.local()  # the layout of the forward running on this thread (None: CP is off)

    # ------------------------------------------------------------------ the row
    def split(self, ids: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, tgt: torch.Tensor, pad_id: int):
        """A packed row's forward inputs ([1, L] ids and positions, its scored flat indices and targets) -> this
        rank's slice of them and the Layout. The row is padded to a multiple of N with fresh positions (a sample
        of its own, never scored)."""
        n, length = self.size, ids.shape[1]
        width = -(-length // n) * n
        if width != length:
            pad = width - length
            ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], 1)
            pos = torch.cat([pos, torch.arange(pad, device=pos.device)[None]], 1)
        local = width // n
        lo, hi = self.rank * local, (self.rank + 1) * local
        owner = torch.div(idx, local, rounding_mode="floor")
        counts = torch.bincount(owner.cpu(), minlength=n).tolist()
        mine = owner == self.rank
        first = sum(counts[: self.rank])
        layout = Layout([_spans(pos[0])], first, counts[self.rank], counts)
        return ids[:, lo:hi], pos[:, lo:hi], idx[mine] - lo, tgt[mine], layout

    def active(self, layout: Layout | None):
        """Within: the trainer's models on this thread attend across the ranks for this layout."""
        return _Active(self._state, layout)

    # ------------------------------------------------------------------ per-token vectors
    def gather(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Every rank's range of a per-token vector, in order: the micro-batch's whole [N] (differentiable: the
        backward keeps this rank's range, every rank computing the same loss from the same whole)."""
        return _GatherTokens.apply(x, layout, self)

    def sum_over_ranks(self, sums: dict) -> dict:
        """Metric sums of each rank's range, added over the ranks (keys ending in _max by maximum)."""
        out = {}
        for k, v in sorted(sums.items()):
            t = self.place(torch.as_tensor(v, dtype=torch.float64).detach().clone())
            dist.all_reduce(t, op=dist.ReduceOp.MAX if k.endswith("_max") else dist.ReduceOp.SUM, group=self.group)
            out[k] = t
        return out

    # ------------------------------------------------------------------ attention
    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """transformers' attention interface: query [B, H, S/n, D], key / value [B, KV, S/n, D] -> [B, S/n, H, D].
        Outside a CP forward (a colocated engine generating with the policy) it is plain sdpa."""
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

        layout = getattr(self._state, "layout", None)
        if layout is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        n, heads, kv = self.size, query.shape[1], key.shape[1]
        if kv % n or heads % n:  # key/value heads that do not split as the query heads do: one per query head
            key, value = repeat_kv(key, heads // kv), repeat_kv(value, heads // kv)
        q, k, v = (heads_to_sequence(t, n, self.rank, self.group) for t in (query, key, value))
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        out = torch.empty_like(q)
        for b, spans in enumerate(layout.spans):
            for start, end in spans:  # each sample attends within itself, causally
                out[b, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                    q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end],
                    dropout_p=dropout, scale=scaling, is_causal=True)[0]
        return sequence_to_heads(out, n, heads, self.group).transpose(1, 2).contiguous(), None

    def register(self) -> None:
        """Make ATTENTION name this group's attention for transformers (and its mask: none under CP, sdpa's
        otherwise), before a model loads with it."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

        state = self._state

        def mask(*args, **kwargs):
            return None if getattr(state, "layout", None) is not None else sdpa_mask(*args, **kwargs)

        AttentionInterface.register(ATTENTION, self.attention)
        AttentionMaskInterface.register(ATTENTION, mask)
        assert ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def _spans(pos: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample of a packed row: its positions restart at 0."""
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [pos.shape[0]]))


class _Active:
    def __init__(self, state, layout):
        self.state, self.layout = state, layout

    def __enter__(self):
        self.previous = getattr(self.state, "layout", None)
        self.state.layout = self.layout

    def __exit__(self, *exc):
        self.state.layout = self.previous


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout: Layout, cp: ContextParallel):
        ctx.layout = layout
        most = max(layout.counts)
        padded = cp.place(torch.zeros((most,) + x.shape[1:], dtype=x.dtype, device=x.device))
        padded[: x.shape[0]] = x
        parts = [cp.place(torch.empty_like(padded)) for _ in range(cp.size)]
        dist.all_gather(parts, padded, group=cp.group)
        return torch.cat([p[:c] for p, c in zip(parts, layout.counts)]).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        return grad[layout.first: layout.first + layout.count], None, None
