"""SFT examples: tokenise conversations with assistant-only targets, pack them into token batches.

Targets are stored already shifted (targets[t] is the token after position t, or
-100 where no loss applies), so packing can never make one sample predict the
first token of the next. Packed rows restart position_ids at every sample;
transformers turns restarting positions into a block-diagonal causal mask, so
packed samples do not attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.config import DataConfig
from r1cli.data.templates import render_turns, row_messages
from r1cli.errors import R1Error
from r1cli.parsing import fenced_observations
from r1cli.token_batch import IGNORE, TokenBatch


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
        # a tool's output inside a response (```output blocks) is context, as in RL: no loss on it
        pieces = fenced_observations(text) if is_assistant and cfg.mask_tool_output else [(text, False)]
        for piece_text, tool_output in pieces:
            piece = tokenizer(piece_text, add_special_tokens=False)["input_ids"]
            ids += piece
            trainable += [is_assistant and not tool_output] * len(piece)
    ids, trainable = ids[: cfg.max_seq_len], trainable[: cfg.max_seq_len]
    targets = [ids[t + 1] if trainable[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets, list(range(len(ids))))


def tokenize_rows(rows: list[dict], tokenizer, cfg: DataConfig, source: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        msgs = row_messages(row, cfg)
        if msgs is None:
            where = rows.where(i) if hasattr(rows, "where") else f"{source}: row {i + 1}"
            raise R1Error(f"{where}: row has neither '{cfg.messages_field}' nor "
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


def to_token_batch(rows: list[Example]) -> TokenBatch:
    return TokenBatch([r.input_ids for r in rows], [r.targets for r in rows], [r.position_ids for r in rows])
