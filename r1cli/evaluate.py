"""Held-out answer accuracy: sample completions for prompts and check them with the accuracy reward."""

from __future__ import annotations

from r1cli.config import Config
from r1cli.records import field
from r1cli.rewards import RewardContext, score
from r1cli.templates import render_prompt


def reward_context(cfg: Config) -> RewardContext:
    return RewardContext(prefill=cfg.data.prefill, language=cfg.rewards.language,
                         answer_field=cfg.data.answer_field, task_field=cfg.data.task_field)


def answer_accuracy(engine, tokenizer, rows: list[dict], cfg: Config, *, n: int = 1, temperature: float = 0.0,
                    seed: int = 0, source: str = "eval") -> dict:
    """pass@1 as the mean over n samples per prompt (greedy when temperature == 0)."""
    prompts = [render_prompt(tokenizer, str(field(r, cfg.data.prompt_field, source, i)), cfg.data)
               for i, r in enumerate(rows)]
    groups = engine.generate(prompts, n, [seed + i for i in range(len(prompts))], temperature=temperature,
                             max_new_tokens=cfg.train.eval_max_new_tokens)
    ctx = reward_context(cfg)
    texts = [c.text for group in groups for c in group]
    correct = score(texts, [row for row in rows for _ in range(n)], {"accuracy": 1.0}, ctx).total
    return {"accuracy": sum(correct) / max(1, len(correct)),
            "examples": [(p, g[0].text) for p, g in zip(prompts[:2], groups[:2])]}


def held_out_accuracy(trainer, engine, rows: list[dict], cfg: Config) -> dict:
    """Accuracy over held-out rows, each rank sampling its share; same figure on every rank."""
    mine = rows[trainer.rank:: trainer.world_size]
    res = answer_accuracy(engine, trainer.tokenizer, mine, cfg, n=cfg.train.eval_n,
                          temperature=cfg.train.eval_temperature, seed=cfg.train.seed, source=cfg.data.eval)
    total = trainer.all_reduce_sum(res["accuracy"] * len(mine))
    return {"eval/accuracy": total / len(rows)}
