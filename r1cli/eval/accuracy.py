"""Held-out answer accuracy: sample completions for prompts and check them with the accuracy reward."""

from __future__ import annotations

from r1cli.config import DataConfig
from r1cli.data.records import field
from r1cli.data.templates import render_prompt
from r1cli.interfaces import RolloutEngine, SamplingParams
from r1cli.rewards import RewardContext, score


def encode_prompts(tokenizer, rows: list[dict], data: DataConfig, source: str) -> list[list[int]]:
    """Each row's prompt, rendered with data.template and data.prefill, as token ids."""
    texts = [render_prompt(tokenizer, str(field(r, data.prompt_field, source, i)), data) for i, r in enumerate(rows)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def answer_accuracy(engine: RolloutEngine, tokenizer, rows: list[dict], data: DataConfig, params: SamplingParams,
                    ctx: RewardContext, source: str = "eval") -> float:
    """pass@1 as the mean correctness over params.n samples per prompt (greedy when temperature == 0)."""
    groups = engine.generate(encode_prompts(tokenizer, rows, data, source), params)
    texts = [c.text for group in groups for c in group]
    correct = score(texts, [row for row in rows for _ in range(params.n)], {"accuracy": 1.0}, ctx).total
    return sum(correct) / max(1, len(correct))


def held_out_accuracy(engine: RolloutEngine, tokenizer, rows: list[dict], data: DataConfig, params: SamplingParams,
                      ctx: RewardContext, parallel) -> dict:
    """Accuracy over held-out rows, each data-parallel rank sampling its share; same figure on every rank."""
    mine = rows[parallel.dp_rank:: parallel.dp_size]
    acc = answer_accuracy(engine, tokenizer, mine, data, params, ctx, source=data.eval)
    return {"eval/accuracy": parallel.all_reduce_sum(acc * len(mine)) / len(rows)}
