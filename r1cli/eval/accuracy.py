"""Held-out answer accuracy: sample completions for prompts and check them with the accuracy reward."""

from __future__ import annotations

from r1cli.config import Config, DataConfig
from r1cli.data.prompts import encode_prompts
from r1cli.data.records import read_data
from r1cli.interfaces import RolloutEngine, SamplingParams, build_engine
from r1cli.rewards import RewardContext, score
from r1cli.tools import with_tool_schemas
from r1cli.tools.turns import with_tools


def answer_accuracy(engine: RolloutEngine, tokenizer, rows, data: DataConfig, params: SamplingParams,
                    ctx: RewardContext, parallel=None) -> float:
    """pass@1 as the mean correctness over params.n samples per prompt (greedy when temperature == 0); under
    model parallelism the replica's leader generates and shares."""
    lead = parallel is None or parallel.is_replica_leader
    groups = engine.generate(encode_prompts(tokenizer, rows, data) if lead else [], params)
    if parallel is not None:
        groups = parallel.share_in_replica(groups)
    texts = [c.text for group in groups for c in group]
    correct = score(texts, [row for row in rows for _ in range(params.n)], {"accuracy": 1.0}, ctx).total
    return sum(correct) / max(1, len(correct))


def held_out_accuracy(engine: RolloutEngine, tokenizer, rows, data: DataConfig, params: SamplingParams,
                      ctx: RewardContext, parallel) -> dict:
    """Accuracy over held-out rows, each data-parallel rank sampling its share; same figure on every rank."""
    mine = rows[parallel.dp_rank:: parallel.dp_size]
    acc = answer_accuracy(engine, tokenizer, mine, data, params, ctx, parallel)
    return {"eval/accuracy": parallel.all_reduce_sum(acc * len(mine)) / len(rows)}


def held_out_evaluator(cfg: Config, trainer, engine=None):
    """A closure scoring held-out accuracy with one rollout engine for the whole run (built at its first use,
    weights refreshed before each evaluation), or None without data.eval."""
    if not cfg.data.eval:
        return None
    rows = read_data(cfg.data.eval, cfg.data, cfg.eval.samples)
    rows.require(cfg.data.answer_field, "data.answer_field")
    ctx = RewardContext.from_config(cfg.data, cfg.rewards)
    params = SamplingParams.from_eval(cfg.eval, cfg.rollout.stop, seed=cfg.train.seed)
    data = with_tool_schemas(cfg.data, cfg.rollout)
    box = [engine]

    def evaluate() -> dict:
        if box[0] is None:  # starts from the current weights
            box[0] = with_tools(build_engine(cfg.model, cfg.rollout, trainer), trainer.tokenizer, cfg.rollout,
                                cfg.data)
        else:
            box[0].load_weights(trainer.named_weights())
        return held_out_accuracy(box[0], trainer.tokenizer, rows, data, params, ctx, trainer.parallel)

    return evaluate


def model_accuracy(cfg: Config) -> dict:
    """Held-out accuracy of the model at cfg.model.path as it is (no trainer), as a training run measures it."""
    from r1cli.interfaces import build_parallel
    from r1cli.models.loading import load_tokenizer

    rows = read_data(cfg.data.eval, cfg.data, cfg.eval.samples)
    rows.require(cfg.data.answer_field, "data.answer_field")
    params = SamplingParams.from_eval(cfg.eval, cfg.rollout.stop, seed=cfg.train.seed)
    engine = build_engine(cfg.model, cfg.rollout)
    return held_out_accuracy(engine, load_tokenizer(cfg.model.path), rows, cfg.data, params,
                             RewardContext.from_config(cfg.data, cfg.rewards), build_parallel())
