"""The Megatron trainer's packed micro-batches: every data-parallel rank runs as many (FP8's amax reduction and a
mixture of experts' all-to-all meet in each one), so a rank whose rows pack into fewer halves its fullest."""

from types import SimpleNamespace

from r1cli.backends.megatron.trainer import MegatronTrainer
from r1cli.token_batch import TokenBatch


def _trainer(budget: int, most: int):
    """Only what _plan reads: the budget, and a data-parallel group whose busiest rank packs `most`."""
    return SimpleNamespace(train_cfg=SimpleNamespace(max_tokens_per_micro_batch=budget),
                           parallel=SimpleNamespace(all_reduce_max=lambda n: max(n, most)))


def test_a_rank_with_fewer_packs_runs_as_many_micro_batches_as_the_busiest():
    batch = TokenBatch([[1] * n for n in (30, 10, 10, 5)], [[1] * n for n in (30, 10, 10, 5)])
    alone, _ = MegatronTrainer._plan(_trainer(40, 0), batch)  # 30+10 | 10+5: two packs
    assert len(alone) == 2
    plan, size = MegatronTrainer._plan(_trainer(40, 3), batch)  # another rank needs three
    assert size == 1 and len(plan) == 3 and sorted(i for rows in plan for i in rows) == [0, 1, 2, 3]
