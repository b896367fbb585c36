"""`r1 sample`: k samples per prompt from a checkpoint, keep the verified-correct ones that pass the filters.

Output (sample.out): SFT-ready JSONL rows {prompt, response, answer, task, verified, source, sample}, usable by
`r1 sft` as they are, written through r1cli.sample.store (resumable exactly, sharded over data-parallel
ranks, stats per task). A row's answer is verified by the task's rule checker; rows without an answer go to
the model named by sample.judge (the record says verified: judge), or are an error without one.
"""

from __future__ import annotations

from r1cli.config import Config, check_generate_only
from r1cli.data.prompts import encode_prompts
from r1cli.data.records import read_data
from r1cli.data.templates import prompt_text
from r1cli.errors import R1Error
from r1cli.interfaces import SamplingParams, build_engine, build_parallel
from r1cli.models import lora
from r1cli.models.loading import load_tokenizer
from r1cli.rewards import RewardContext, check_task_rows, score
from r1cli.run.identity import of_config
from r1cli.sample.judge import AnswerJudge, needs_judge
from r1cli.sample.keep import keep_candidates
from r1cli.sample.store import ResumableOutput
from r1cli.seeds import batch_seed
from r1cli.tools import with_tool_schemas
from r1cli.tools.turns import with_tools


def run_sample(cfg: Config, overwrite: bool = False) -> dict:
    lora.refuse(cfg.model.lora, "sample")
    check_generate_only(cfg, "sample")
    d, s = cfg.data, cfg.sample
    rows = read_data(d.train, d, d.max_samples)
    unanswered = set(needs_judge(rows, d.answer_field))
    if unanswered and not (s.judge or cfg.rewards.judge.path):
        i = min(unanswered)
        raise R1Error(f"{rows.where(i)}: no '{d.answer_field}' to verify samples against (data.answer_field); "
                      "name a judge model with sample.judge=PATH (or rewards.judge.path) or drop such rows")
    check_task_rows(rows, d.task_field, d.answer_field, only=set(range(len(rows))) - unanswered)
    parallel = build_parallel()
    identity = of_config(cfg, ["data", "rollout", "rewards", "sample", "filters", "train.seed"],
                         {"model.path": cfg.model.path, "data.train": d.train, "sample.judge": s.judge,
                          "rewards.judge.path": cfg.rewards.judge.path})
    store = ResumableOutput(s.out, parallel, overwrite, identity, "sample.out")
    tokenizer = load_tokenizer(cfg.model.path)
    engine = with_tools(build_engine(cfg.model, cfg.rollout), tokenizer, cfg.rollout, d)  # rollout.tools: multi-turn
    judge = (AnswerJudge.from_config(cfg) if s.judge else _reward_judge(cfg)) if unanswered else None
    prompts = encode_prompts(tokenizer, rows, with_tool_schemas(d, cfg.rollout))
    ctx = RewardContext.from_config(d, cfg.rewards)
    with store:
        for batch in store.pending(len(rows), s.prompts_per_batch):
            # a fixed seed per batch (its first prompt's position): a redone batch samples the same
            params = SamplingParams.from_rollout(cfg.rollout, seed=batch_seed(cfg.train.seed, batch[0]))
            groups = engine.generate([prompts[i] for i in batch], params)
            for i, group in zip(batch, groups):
                row = rows[i]
                texts = [ctx.full(c.text) for c in group]
                if i in unanswered:
                    how, correct = "judge", judge(prompt_text(row, d), texts)
                else:
                    how, correct = "rule", [v >= 1.0 for v in score(texts, [row] * len(texts), {"accuracy": 1.0},
                                                                    ctx, cfg.rewards.timeout_s).total]
                kept, reasons = keep_candidates(row, texts, [len(c.completion_ids) for c in group],
                                                [bool(ok) for ok in correct], how, d, cfg.filters, ctx,
                                                s.keep_per_prompt,
                                                wrong="wrong answer" if how == "rule" else "judged wrong")
                store.add(i, row.get(d.task_field) or "math", kept, len(texts), reasons)
            store.batch_done()
    return store.finish("r1 sample")


def _reward_judge(cfg: Config):
    """The RL judge (rewards.judge: its engine, template and verdicts) as r1 sample's verifier: a score of at least
    0.5 is a yes."""
    from r1cli.rewards.model_rewards import Judge

    judge = Judge(cfg.rewards.judge, cfg.rollout)
    return lambda question, texts: [v >= 0.5 for v in judge([question] * len(texts), texts, [""] * len(texts))]
