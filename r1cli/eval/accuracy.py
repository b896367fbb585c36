"""Held-out answer accuracy: sample completions for prompts and check them with the accuracy reward."""

from __future__ import annotations

from r1cli.config import DataConfig
from r1cli.data.prompts import encode_prompts
from r1cli.interfaces import RolloutEngine, SamplingParams
from r1cli.rewards import RewardContext, score


def answer_accuracy(engine: RolloutEngine, tokenizer, rows, data: DataConfig, params: SamplingParams,
                    ctx: RewardContext) -> float:
    """pass@1 as the mean correctness over params.n samples per prompt (greedy when temperature == 0)."""
    groups = engine.generate(encode_prompts(tokenizer, rows, data), params)
    texts = [c.text for group in groups for c in group]
    correct = score(texts, [row for row in rows for _ in range(params.n)], {"accuracy": 1.0}, ctx).total
    return sum(correct) / max(1, len(correct))


def held_out_accuracy(engine: RolloutEngine, tokenizer, rows, data: DataConfig, params: SamplingParams,
                      ctx: RewardContext, parallel) -> dict:
    """Accuracy over held-out rows, each data-parallel rank sampling its share; same figure on every rank."""
    mine = rows[parallel.dp_rank:: parallel.dp_size]
    acc = answer_accuracy(engine, tokenizer, mine, data, params, ctx)
    return {"eval/accuracy": parallel.all_reduce_sum(acc * len(mine)) / len(rows)}
