"""Packed micro-batches: which rows share a forward, and the packed row itself."""

import random

import pytest
import torch

from r1cli.token_batch import IGNORE, TokenBatch, balanced_deal, token_budget_micro_batches


def test_every_row_lands_in_exactly_one_micro_batch_within_the_budget():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [int(rng.lognormvariate(4, 1)) + 1 for _ in range(rng.randint(1, 40))]
        budget = rng.choice([64, 200, 1000])
        plan = token_budget_micro_batches(lengths, budget)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
        for mb in plan:  # within the budget, or one row longer than the budget alone
            assert sum(lengths[i] for i in mb) <= budget or len(mb) == 1
        assert plan == token_budget_micro_batches(lengths, budget)  # the same plan on every rank of a replica


def test_first_fit_decreasing_fills_packs_and_splits_to_a_count():
    lengths = [24, 18, 12, 6]
    assert token_budget_micro_batches(lengths, 30) == [[0, 3], [1, 2]]
    assert token_budget_micro_batches([27, 21, 15, 9], 30) == [[0], [1, 3], [2]]
    assert token_budget_micro_batches([100, 5, 5], 50) == [[0], [1, 2]]  # too long: alone
    # an FSDP rank that packs into fewer micro-batches than another splits its fullest ones
    plan = token_budget_micro_batches(lengths, 30, count=3)
    assert len(plan) == 3 and sorted(i for mb in plan for i in mb) == [0, 1, 2, 3]
    assert len(token_budget_micro_batches(lengths, 1000, count=4)) == 4
    with pytest.raises(ValueError, match="4 rows cannot make 5 micro-batches"):
        token_budget_micro_batches(lengths, 1000, count=5)


def test_a_packed_row_keeps_each_samples_positions_and_the_scored_order():
    batch = TokenBatch.from_completions([[1, 2], [3]], [[4, 5, 6], [7, 8]])
    row = batch.packed()
    assert row.input_ids == [[1, 2, 4, 5, 6, 3, 7, 8]]
    assert row.position_ids == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert row.targets == [[IGNORE, 4, 5, 6, IGNORE, 7, 8, IGNORE]]  # no sample predicts the next one's first token
    _, _, _, tgt = row.tensors(0, "cpu")
    _, _, _, padded = batch.tensors(0, "cpu")
    assert torch.equal(tgt, padded)  # the loss reads the scored tokens in the same order
    # rows that were packed already (SFT) keep their own restarts
    sft = TokenBatch([[1, 2, 3, 4]], [[2, IGNORE, 4, IGNORE]], [[0, 1, 0, 1]])
    assert TokenBatch([[9, 9]] + sft.input_ids, [[9, IGNORE]] + sft.targets, [[0, 1]] + sft.position_ids) \
        .packed().position_ids == [[0, 1, 0, 1, 0, 1]]


def test_rows_are_dealt_to_ranks_by_tokens_keeping_each_ranks_row_count():
    lengths = [[90, 10, 12, 11], [15, 80, 9, 14]]  # rank 0 holds 123 tokens, rank 1 118, each its long row
    deal = balanced_deal(lengths)
    assert sorted(x for d in deal for x in d) == [(r, i) for r in range(2) for i in range(4)]
    assert [len(d) for d in deal] == [4, 4]
    loads = [sum(lengths[r][i] for r, i in d) for d in deal]
    assert loads == [90 + 14 + 11 + 9, 80 + 15 + 12 + 10]  # longest first to the lighter rank with room
    # the two long rows end on different ranks even when one rank started with both
    assert {len([x for x in d if lengths[x[0]][x[1]] >= 80]) for d in balanced_deal([[90, 80], [5, 6]])} == {1}


def test_concat_widens_grid_fields_and_keeps_row_order():
    a = TokenBatch.from_completions([[1]], [[2, 3, 4]])
    b = TokenBatch.from_completions([[5], [6]], [[7], [8, 9]])
    for t in (a, b):
        t.fields.update(adv=torch.arange(len(t), dtype=torch.float32), logp=t.scored_mask() * 2)
    c = TokenBatch.concat([b.select([1]), a, b.select([0])])
    assert c.input_ids == [[6, 8, 9], [1, 2, 3, 4], [5, 7]] and c.position_ids is None
    assert c.fields["adv"].tolist() == [1.0, 0.0, 0.0]
    assert c.fields["logp"].tolist() == [[2, 2, 0], [2, 2, 2], [2, 0, 0]]
    assert torch.equal(c.scored_mask() * 2, c.fields["logp"])


def test_a_micro_batch_packs_into_rows_as_wide_as_its_longest():
    """The plan orders a micro-batch's rows so that packed(width of the longest) lays them first-fit decreasing:
    4 rows of 10, 10, 10 and 5 tokens for these 35 tokens instead of 6 padded rows of 10."""
    lengths = [10, 3, 7, 2, 8, 5]
    (mb,) = token_budget_micro_batches(lengths, 100)
    assert mb == [0, 4, 3, 2, 1, 5]
    batch = TokenBatch([[i] * n for i, n in enumerate(lengths)], [[IGNORE] * n for n in lengths])
    rows = batch.select(mb).packed(10)
    assert [len(r) for r in rows.input_ids] == [10, 10, 10, 5]
    assert rows.input_ids[1] == [4] * 8 + [3] * 2 and rows.position_ids[1] == list(range(8)) + [0, 1]
