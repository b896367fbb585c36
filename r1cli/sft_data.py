"""SFT examples: tokenise conversations with assistant-only targets, pack them, batch them.

Targets are stored already shifted (targets[t] is the token after position t, or
-100 where no loss applies), so packing can never make one sample predict the
first token of the next. Packed rows restart position_ids at every sample;
transformers turns restarting positions into a block-diagonal causal mask, so
packed samples do not attend to each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from r1cli.config import DataConfig
from r1cli.errors import R1Error
from r1cli.templates import render_turns, row_messages

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def tokenize_conversation(tokenizer, messages: list[dict], cfg: DataConfig) -> Example:
    ids: list[int] = []
    trainable: list[bool] = []
    for text, is_assistant in render_turns(tokenizer, messages, cfg):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trainable += [is_assistant] * len(piece)
    ids, trainable = ids[: cfg.max_seq_len], trainable[: cfg.max_seq_len]
    targets = [ids[t + 1] if trainable[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets, list(range(len(ids))))


def tokenize_rows(rows: list[dict], tokenizer, cfg: DataConfig, source: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        msgs = row_messages(row, cfg)
        if msgs is None:
            raise R1Error(f"{source}: row {i + 1} has neither '{cfg.messages_field}' nor "
                          f"'{cfg.prompt_field}' + '{cfg.response_field}' (it has: {', '.join(row)})")
        ex = tokenize_conversation(tokenizer, msgs, cfg)
        if ex.n_targets:
            out.append(ex)
    if not out:
        raise R1Error(f"{source}: no row has assistant tokens within data.max_seq_len={cfg.max_seq_len}")
    return out


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy in-order packing into rows of at most max_len tokens."""
    rows: list[Example] = []
    cur = Example([], [], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_len:
            rows.append(cur)
            cur = Example([], [], [])
        cur.input_ids += ex.input_ids
        cur.targets += ex.targets
        cur.position_ids += ex.position_ids
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding gets fresh positions and no targets."""
    width = max(len(r.input_ids) for r in rows)
    ids, tgt, pos = [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * pad)
        tgt.append(r.targets + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "targets": torch.tensor(tgt), "position_ids": torch.tensor(pos)}


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
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # one epoch at a time is enough
        return self._perms[epoch]

    def rows_for_step(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.per_step)]

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n


def shard_micro_batches(indices: list[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one global step: a contiguous slice, split grad_accum ways."""
    per_rank = len(indices) // world
    mine = indices[rank * per_rank: (rank + 1) * per_rank]
    per_micro = per_rank // grad_accum
    return [mine[i * per_micro: (i + 1) * per_micro] for i in range(grad_accum)]
