"""TokenBatch: rows of token ids, which of their tokens are scored, and per-row tensors riding along.

The one currency of the trainer door. An SFT row is a packed run of conversations whose
assistant tokens are scored; a GRPO row is prompt + completion with the completion
scored. Row b's scored tokens, in order, form row b of a [B, C] grid (C = the most
scored tokens in a row); `fields` hold per-row tensors ([B] or [B, C] on that grid)
that select() slices with the rows, so a backend can cut any micro-batches it likes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

IGNORE = -100


@dataclass
class TokenBatch:
    input_ids: list[list[int]]
    targets: list[list[int]]  # targets[b][t]: the token predicted at position t, IGNORE where not scored
    position_ids: list[list[int]] | None = None  # None: 0..len-1 (packed rows restart at each sample)
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    # MoE routing replay: per row, the experts the engine routed each input position to [len(row), layers, k]
    # (r1cli.models.routing_replay; -1 where none was recorded), or None
    routing: list[torch.Tensor] | None = None

    @classmethod
    def from_completions(cls, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         observation: list[list[bool] | None] | None = None,
                         routing: list[torch.Tensor] | None = None) -> "TokenBatch":
        """Prompt + completion rows; completion token j is predicted at position len(prompt) - 1 + j. `observation`
        marks the completion tokens a tool wrote (multi-turn rollouts): context the model reads, not tokens it chose,
        so they are not scored - out of the loss, the KL, the entropy and the scored grid."""
        obs = observation or [None] * len(prompt_ids)
        targets = [[IGNORE] * (len(p) - 1) + [IGNORE if o and o[j] else t for j, t in enumerate(c)] + [IGNORE]
                   for p, c, o in zip(prompt_ids, completion_ids, obs)]
        return cls([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)], targets, routing=routing)

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def counts(self) -> list[int]:
        """Scored tokens per row (targets are not changed after construction)."""
        return [sum(t != IGNORE for t in row) for row in self.targets]

    def scored_mask(self) -> torch.Tensor:
        """[B, C] 1.0 where row b has a j-th scored token."""
        counts = self.counts
        grid = torch.zeros(len(self), max(1, max(counts, default=0)))
        for b, n in enumerate(counts):
            grid[b, :n] = 1.0
        return grid

    def select(self, rows: list[int]) -> "TokenBatch":
        pick = torch.tensor(rows, dtype=torch.long)
        width = max(1, max(self.counts[b] for b in rows))
        fields = {k: (v[pick] if v.dim() == 1 else v[pick, :width]) for k, v in self.fields.items()}
        return TokenBatch([self.input_ids[b] for b in rows], [self.targets[b] for b in rows],
                          None if self.position_ids is None else [self.position_ids[b] for b in rows], fields,
                          None if self.routing is None else [self.routing[b] for b in rows])

    @classmethod
    def concat(cls, parts: list["TokenBatch"]) -> "TokenBatch":
        """The rows of several batches in order; [B, C] fields are widened with zeros to the widest part's C."""
        rows = [(b, k) for b in parts for k in range(len(b))]
        pos = None if all(b.position_ids is None for b in parts) else [
            list(b.position_ids[k]) if b.position_ids is not None else list(range(len(b.input_ids[k])))
            for b, k in rows]
        fields = {}
        for name in parts[0].fields:
            vs = [b.fields[name] for b in parts]
            if vs[0].dim() == 2:
                width = max(v.shape[1] for v in vs)
                vs = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in vs]
            fields[name] = torch.cat(vs)
        routing = None if any(b.routing is None for b in parts) else [b.routing[k] for b, k in rows]
        return cls([b.input_ids[k] for b, k in rows], [b.targets[k] for b, k in rows], pos, fields, routing)

    def packed(self, width: int | None = None) -> "TokenBatch":
        """The rows laid end to end, in order, into rows of at most `width` tokens (a new row where the next does not
        fit; a longer one alone; None: all in one row), each keeping its own positions (restarting at every sample,
        which is how transformers and the Megatron backend tell the samples of a packed row apart: attention stays
        within each). Scored tokens keep their order, so a loss reads them as it reads this batch's."""
        ids: list[list[int]] = []
        tgt: list[list[int]] = []
        pos: list[list[int]] = []
        routing: list[list[torch.Tensor]] = []
        for b, row in enumerate(self.input_ids):
            if not ids or (width is not None and len(ids[-1]) + len(row) > width):
                ids.append([]), tgt.append([]), pos.append([]), routing.append([])
            ids[-1] += row
            tgt[-1] += self.targets[b]
            pos[-1] += self.position_ids[b] if self.position_ids is not None else range(len(row))
            if self.routing is not None:
                routing[-1].append(self.routing[b])
        return TokenBatch(ids, tgt, pos, routing=None if self.routing is None else [torch.cat(r) for r in routing])

    def routing_grid(self) -> torch.Tensor | None:
        """[B * L, layers, k] the recorded experts of every position of tensors()' right-padded [B, L] rows (-1 on
        padding), in the order a router sees them; None without routing."""
        if self.routing is None:
            return None
        width = max(len(r) for r in self.input_ids)
        first = self.routing[0]
        grid = first.new_full((len(self), width, *first.shape[1:]), -1)
        for b, r in enumerate(self.routing):
            grid[b, : r.shape[0]] = r
        return grid.reshape(-1, *first.shape[1:])

    def tensors(self, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded input_ids and position_ids [B, L], the flat indices (b * L + t) of scored positions [N]
        and their targets [N], row by row: the order of the scored grid."""
        width = max(len(r) for r in self.input_ids)
        ids = torch.full((len(self), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(self), width), IGNORE, dtype=torch.long)
        pos = torch.arange(width).expand(len(self), -1).clone()
        for b, row in enumerate(self.input_ids):
            ids[b, : len(row)] = torch.tensor(row)
            tgt[b, : len(row)] = torch.tensor(self.targets[b])
            if self.position_ids is not None:  # padding keeps fresh positions
                pos[b, : len(row)] = torch.tensor(self.position_ids[b])
                pos[b, len(row):] = torch.arange(width - len(row))
        flat = tgt.reshape(-1)
        index = (flat != IGNORE).nonzero().squeeze(-1)
        return ids.to(device), pos.to(device), index.to(device), flat[index].to(device)


def _first_fit_decreasing(items: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of at most `capacity` tokens (an item longer than that alone), longest item first; each bin in the
    order its items went in."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        k = next((k for k, load in enumerate(loads) if load + lengths[i] <= capacity), None)
        if k is None:
            bins.append([i])
            loads.append(lengths[i])
        else:
            bins[k].append(i)
            loads[k] += lengths[i]
    return bins


def token_budget_micro_batches(lengths: list[int], max_tokens: int, count: int = 1) -> list[list[int]]:
    """The rows of each micro-batch when a micro-batch holds at most max_tokens tokens: first-fit decreasing by
    length (a row longer than max_tokens goes alone), then the fullest micro-batches halved until there are at least
    `count` (FSDP ranks must run equally many forwards). Within a micro-batch the rows are in the order that
    TokenBatch.packed(width) fits into rows as wide as its longest: first-fit decreasing again. Deterministic in
    the lengths, so every rank of a replica cuts the same micro-batches."""
    if count > len(lengths):
        raise ValueError(f"{len(lengths)} rows cannot make {count} micro-batches")
    bins = _first_fit_decreasing(list(range(len(lengths))), lengths, max_tokens)
    while len(bins) < count:  # halve the fullest micro-batch of several rows, alternating by length
        k = max((k for k in range(len(bins)) if len(bins[k]) > 1), key=lambda k: sum(lengths[i] for i in bins[k]))
        bins.append(bins[k][1::2])
        bins[k] = bins[k][::2]
    width = lambda b: max(lengths[i] for i in b)  # noqa: E731
    return [[i for row in _first_fit_decreasing(b, lengths, width(b)) for i in row]
            for b in sorted(bins, key=min)]


def balanced_deal(lengths: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Rows of every data-parallel rank (lengths[r][i]: rank r's row i) dealt back to the ranks so that each holds as
    many rows as it had and about the same number of tokens: the longest row first, to the rank with the fewest
    tokens among those with room (ties: the lower rank). Returns, per rank, the (source rank, row) it takes, in
    source order; the same on every rank."""
    room = [len(rows) for rows in lengths]
    loads = [0] * len(lengths)
    deal: list[list[tuple[int, int]]] = [[] for _ in lengths]
    for n, r, i in sorted(((n, r, i) for r, rows in enumerate(lengths) for i, n in enumerate(rows)),
                          key=lambda x: (-x[0], x[1], x[2])):
        k = min((k for k in range(len(lengths)) if len(deal[k]) < room[k]), key=lambda k: (loads[k], k))
        deal[k].append((r, i))
        loads[k] += n
    return [sorted(d) for d in deal]


def balance_ranks(batch: TokenBatch, parallel) -> TokenBatch:
    """This rank's share of every data-parallel rank's rows after balanced_deal: each rank the same number of rows
    and about the same number of tokens (the ranks wait on the slowest at every optimizer step). A collective."""
    parts = parallel.all_gather(batch)
    if len(parts) == 1:
        return batch
    mine = balanced_deal([[len(r) for r in b.input_ids] for b in parts])[parallel.dp_rank]
    return TokenBatch.concat([parts[r].select([i]) for r, i in mine])
