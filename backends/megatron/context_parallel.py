"""Context parallelism on the Megatron backend: a micro-batch as Transformer Engine's THD attention splits it over the
context-parallel ranks (megatron-core's context_parallel_size, TE's ring attention).

The micro-batch is one packed row; each sample is padded to a multiple of 2 x CP (times TP under sequence parallelism,
and 16 under FP8) and cut into 2 x CP chunks, of which rank r holds chunks r and 2CP-1-r - the first and the last
chunks on one rank, so every rank does about the same share of the causal attention. This is the layout of TE's
`thd_get_partitioned_indices` (megatron-core's get_thd_batch_on_this_cp_rank), written out here so that it can be
held to its definition on a CPU; TE's attention itself, and so this path's numbers, need GPUs with Transformer Engine.
The scored tokens of each rank are gathered back into the row's order for the loss (ContextParallel.gather, then a
fixed permutation), so the GRPO, SFT and distillation losses run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1cli.errors import R1Error


def check_context_parallel(cp: int, te: bool, pp: int, shape) -> None:
    """What the Megatron backend's context parallelism takes, in one line each, before a model is built."""
    where = f"parallel.context_parallel={cp} on parallel.backend=megatron"
    if not te:
        raise R1Error(f"{where} needs Transformer Engine's attention (parallel.megatron.layers=te on a GPU with "
                      "transformer_engine: pip install 'r1[te]'); megatron's local attention cannot split a sequence. "
                      "parallel.backend=torch splits one on any device (Ulysses)")
    if pp > 1:
        raise R1Error(f"{where} with pipeline_parallel={pp} is not built (the stages would need every micro-batch's "
                      "split to one shape): use tensor and context parallelism, or parallel.backend=torch")
    if shape.experts is not None:
        raise R1Error(f"{where} is not built for a mixture of experts ({shape.model_type})")


def padded_samples(pos: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of a packed row (positions [L] restarting at each) padded to multiples of `multiple`:
    (cu_seqlens [S + 1], padded cu_seqlens [S + 1], both int32, and where [L]: each token's index in the padded
    row)."""
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] - pos[:-1] != 1
    first = starts.nonzero().flatten()
    lengths = torch.diff(torch.cat([first, torch.tensor([pos.numel()])]))
    padded = (lengths + multiple - 1) // multiple * multiple
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    cu_pad = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    sample = starts.long().cumsum(0) - 1
    where = cu_pad[sample] + (torch.arange(pos.numel()) - cu[sample])
    return cu.to(torch.int32), cu_pad.to(torch.int32), where


def partition(cu_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s token indices of the padded row: in every sample (padded length n, a multiple of 2 x cp) the
    chunks rank and 2cp-1-rank of size n / (2cp), in order - TE's thd_get_partitioned_indices."""
    out = []
    for a, b in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        size = (b - a) // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            out.append(torch.arange(a + chunk * size, a + (chunk + 1) * size))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@dataclass
class RowSplit:
    """This rank's part of one micro-batch: its tokens, its scored tokens, and how to put every rank's scored
    tokens back in the row's order."""

    ids: torch.Tensor  # [1, T / cp]
    pos: torch.Tensor
    idx: torch.Tensor  # this rank's scored positions within its tokens, in the row's order
    tgt: torch.Tensor
    thd: dict  # PackedSeqParams fields
    counts: list[int]  # every rank's number of scored tokens
    order: torch.Tensor  # [N]: the row's j-th scored token is entry order[j] of the ranks' tokens laid end to end


def split_row(ids: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, tgt: torch.Tensor, pad_id: int, cp: int,
              rank: int, multiple: int) -> RowSplit:
    """One packed row [1, L] (its scored flat indices `idx` and targets) as rank `rank` of `cp` holds it; every
    sample padded to a multiple of 2 x cp x `multiple`."""
    cu, cu_pad, where = padded_samples(pos[0], 2 * cp * multiple)
    total = int(cu_pad[-1])
    full_ids = torch.full((total,), pad_id, dtype=ids.dtype)
    full_ids[where] = ids[0]
    full_pos = torch.arange(total) - torch.repeat_interleave(cu_pad[:-1].long(), torch.diff(cu_pad.long()))
    owner = torch.empty(total, dtype=torch.long)
    local = torch.empty(total, dtype=torch.long)
    for r in range(cp):
        part = partition(cu_pad, cp, r)
        owner[part] = r
        local[part] = torch.arange(part.numel())
    mine = partition(cu_pad, cp, rank)
    scored = where[idx]
    by = owner[scored]
    counts = torch.bincount(by, minlength=cp).tolist()
    offset = torch.tensor([0] + counts[:-1]).cumsum(0)
    nth = torch.zeros_like(by)
    for r in range(cp):  # the j-th scored token of rank r sits at offset[r] + j of the ranks' tokens end to end
        hit = by == r
        nth[hit] = torch.arange(int(hit.sum()))
    longest = int((cu_pad[1:] - cu_pad[:-1]).max())
    thd = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
               cu_seqlens_kv_padded=cu_pad, max_seqlen_q=longest, max_seqlen_kv=longest)
    return RowSplit(full_ids[mine][None], full_pos[mine][None], local[scored[by == rank]], tgt[by == rank], thd,
                    counts, offset[by] + nth)
