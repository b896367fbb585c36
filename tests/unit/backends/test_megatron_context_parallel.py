"""The Megatron backend's context-parallel split of a packed row (backends/megatron/context_parallel.py), held to its
definition - TE's thd_get_partitioned_indices layout, which only a GPU with Transformer Engine runs - on the CPU: each
sample padded to a multiple of 2 x CP, rank r holding its chunks r and 2CP-1-r, every token on exactly one rank, and
the ranks' scored tokens put back in the row's order."""

import pytest
import torch

from r1cli.backends.megatron.context_parallel import padded_samples, partition, split_row


def test_each_rank_holds_the_first_and_the_last_chunks_of_every_sample():
    cu_pad = torch.tensor([0, 8, 16], dtype=torch.int32)  # two samples of 8 padded tokens: chunks of 2 at CP=2
    assert partition(cu_pad, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert partition(cu_pad, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


def test_samples_are_padded_to_the_multiple_and_tokens_keep_their_place():
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0])  # samples of 3, 5 and 1 tokens
    cu, cu_pad, where = padded_samples(pos, 4)
    assert cu.tolist() == [0, 3, 8, 9] and cu_pad.tolist() == [0, 4, 12, 16]
    assert where.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_token_on_one_rank_and_the_scored_tokens_back_in_order(cp):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 30, 1, 12]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(3, 100, pos.shape, generator=g)
    scored = torch.rand(pos.shape[1], generator=g) < 0.6
    idx = scored.nonzero().flatten()
    tgt = ids[0, idx] + 1000
    splits = [split_row(ids, pos, idx, tgt, 0, cp, r, multiple=2) for r in range(cp)]
    cu_pad = splits[0].thd["cu_seqlens_q_padded"]
    assert all(int(n) % (2 * cp * 2) == 0 for n in torch.diff(cu_pad))
    held = torch.cat([partition(cu_pad, cp, r) for r in range(cp)]).sort().values
    assert torch.equal(held, torch.arange(int(cu_pad[-1])))  # each padded token on exactly one rank
    assert sum(s.ids.shape[1] for s in splits) == int(cu_pad[-1]) and len({s.ids.shape[1] for s in splits}) == 1
    # a per-token vector of each rank's scored tokens (here their targets), laid end to end, then `order`
    together = torch.cat([s.tgt for s in splits])
    assert torch.equal(together[splits[0].order], tgt)
    for s in splits:  # the scored positions point at the scored tokens in each rank's own ids
        assert torch.equal(s.ids[0, s.idx] + 1000, s.tgt)
    assert splits[0].thd["cu_seqlens_q"].tolist() == [0, 7, 37, 38, 50]
