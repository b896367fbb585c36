"""Which rows each step reads, and which of them are this data-parallel rank's."""

from __future__ import annotations

import random

from r1cli.seeds import epoch_seed


class RowSchedule:
    """Which rows each step reads: an endless stream of seeded per-epoch shuffles.

    The position in the stream is a pure function of the step, so resuming at
    step k reads exactly what the uninterrupted run would have read.
    """

    def __init__(self, n_rows: int, rows_per_step: int, seed: int, shuffle: bool):
        self.n, self.per_step, self.seed, self.shuffle = n_rows, rows_per_step, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            if self.shuffle:
                random.Random(epoch_seed(self.seed, epoch)).shuffle(order)
            self._perms = {epoch: order}  # one epoch at a time is enough
        return self._perms[epoch]

    def rows_for_step(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.per_step)]

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n


def rank_share(indices: list[int], rank: int, size: int) -> list[int]:
    """Data-parallel rank `rank`'s contiguous slice of one global step's rows."""
    per_rank = len(indices) // size
    return indices[rank * per_rank: (rank + 1) * per_rank]
