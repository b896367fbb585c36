"""`r1 coldstart`: long chains of thought in the readable format, filtered and verified, then SFT on them.

    candidates   a generator model prompted with coldstart.shots exemplars (optionally a second, reflecting
                 pass), or with no generator the rows' own worked solutions (data.response_field)
    readable     <think>reasoning</think><answer>final answer</answer>
    filters      no final answer, over-long, bad format, mixed language, code block, long paragraph
    verified     the task's rule checker where the row has a ground truth (data.answer_field)
    SFT          the same loop as `r1 sft`, on coldstart.out (skipped with --data-only)

The data goes through r1cli.sample.store: a killed run restarted continues exactly, stats per task.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from r1cli.coldstart.readable import draft_before_answer, few_shot_prompt, readable
from r1cli.config import Config
from r1cli.data.records import read_data, read_records
from r1cli.errors import R1Error
from r1cli.interfaces import SamplingParams, build_engine, build_parallel
from r1cli.models.loading import load_tokenizer
from r1cli.rewards import RewardContext, check_task_rows, score
from r1cli.run.console import console
from r1cli.run.harness import check_run_dir
from r1cli.run.identity import matches, of_config
from r1cli.sample.keep import keep_candidates
from r1cli.sample.store import ResumableOutput, identity_record
from r1cli.seeds import batch_seed, second_pass_seed


class Generator:
    """Few-shot long-CoT generation: `candidates(rows, batch)` -> per prompt, the completions as text (prefill
    included) with their token counts."""

    def __init__(self, cfg: Config):
        c, d = cfg.coldstart, cfg.data
        if not c.exemplars and c.shots:
            raise R1Error("coldstart.generator needs coldstart.exemplars (a JSONL of long-CoT examples), "
                          "or coldstart.shots=0 for zero-shot prompting")
        self.exemplars = read_records(c.exemplars, 0, d.max_line_mb << 20) if c.shots else []
        if self.exemplars:
            self.exemplars.require(d.prompt_field, "data.prompt_field")
            self.exemplars.require(d.response_field, "data.response_field")
        self.cfg = cfg
        self.engine = build_engine(replace(cfg.model, path=c.generator), cfg.rollout)
        self.tokenizer = load_tokenizer(c.generator)

    def _shots(self, i: int) -> list[dict]:
        """coldstart.shots exemplars, rotating with the prompt so that no single one dominates."""
        n = len(self.exemplars)
        return [self.exemplars[(i + k) % n] for k in range(min(self.cfg.coldstart.shots, n))]

    def candidates(self, rows, batch: list[int], seed: int) -> list[list[tuple[str, int]]]:
        d, c = self.cfg.data, self.cfg.coldstart
        fields = (d.prompt_field, d.response_field)
        texts = [few_shot_prompt(self.tokenizer, self._shots(i), str(rows[i][d.prompt_field]), d, fields)
                 for i in batch]
        encode = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        params = SamplingParams.from_rollout(self.cfg.rollout, seed=seed)
        groups = self.engine.generate([encode(t) for t in texts], params)
        out = [[(d.prefill + g.text, len(g.completion_ids)) for g in group] for group in groups]
        if not c.reflect:
            return out
        # the second pass: each draft's reasoning, a request to verify it, and the generator goes on from there
        drafts = [(p, draft_before_answer(text) + c.reflect_prompt)
                  for p, group in zip(texts, out) for text, _ in group]
        again = self.engine.generate([encode(p + draft[len(d.prefill):]) for p, draft in drafts],
                                     replace(params, n=1, seed=second_pass_seed(seed)))
        flat = [(draft + g[0].text, len(encode(draft)) + len(g[0].completion_ids)) for (_, draft), g in
                zip(drafts, again)]
        return [flat[k * params.n: (k + 1) * params.n] for k in range(len(batch))]


def build_coldstart_data(cfg: Config, overwrite: bool = False) -> dict:
    """Write coldstart.out (resumable; stats beside it) and return the per-task stats."""
    d, c = cfg.data, cfg.coldstart
    rows = read_data(d.train, d, d.max_samples)
    if not c.generator:
        rows.require(d.response_field, "data.response_field (the worked solutions used without coldstart.generator)")
    if c.verify:  # rows with a ground truth are checked by their task's checker
        check_task_rows(rows, d.task_field, d.answer_field,
                        only={i for i, r in enumerate(rows) if r.get(d.answer_field) not in (None, "")})
    parallel = build_parallel()
    identity = of_config(cfg, ["data", "rewards", "coldstart", "filters", "train.seed"] + (["rollout"] if c.generator
                                                                                           else []),
                         {"data.train": d.train, "coldstart.generator": c.generator,
                          "coldstart.exemplars": c.exemplars if c.generator and c.shots else ""})
    # --overwrite starts the data again only if its inputs changed: the same inputs give the same rows (fixed
    # seeds per batch), so an SFT phase that failed never costs the data phase again
    if overwrite and matches(identity_record(c.out), identity):
        overwrite = False
        if parallel.is_main:
            console.print(f"coldstart data {c.out}: the same inputs as before, kept (continued if unfinished)")
    store = ResumableOutput(c.out, parallel, overwrite, identity, "coldstart.out")
    generator = Generator(cfg) if c.generator else None
    tokenizer = generator.tokenizer if generator else load_tokenizer(cfg.model.path)
    ctx = RewardContext(language=cfg.rewards.language, answer_field=d.answer_field, task_field=d.task_field)
    with store:
        for batch in store.pending(len(rows), c.prompts_per_batch):
            if generator:
                groups = generator.candidates(rows, batch, seed=batch_seed(cfg.train.seed, batch[0]))
            else:
                groups = [[(t := str(rows[i][d.response_field]), len(tokenizer(t, add_special_tokens=False)
                                                                        ["input_ids"]))] for i in batch]
            for i, group in zip(batch, groups):
                row = rows[i]
                texts = [readable(t) for t, _ in group]
                checkable = c.verify and row.get(d.answer_field) not in (None, "")
                verdicts = [v >= 1.0 for v in score(texts, [row] * len(texts), {"accuracy": 1.0}, ctx,
                                                    cfg.rewards.timeout_s).total] \
                    if checkable else [None] * len(texts)
                kept, reasons = keep_candidates(row, texts, [n for _, n in group], verdicts,
                                                "rule" if checkable else "none", d, cfg.filters, ctx,
                                                c.keep_per_prompt, require_verified=c.require_verified)
                store.add(i, row.get(d.task_field) or "math", kept, len(texts), reasons)
            store.batch_done()
    return store.finish("r1 coldstart")


def run_coldstart(cfg: Config, resume: bool = False, overwrite: bool = False, data_only: bool = False) -> dict:
    """The data (continued where a killed run stopped; --overwrite starts it over), then SFT on it."""
    if not data_only:
        check_run_dir(cfg, resume, overwrite)
    stats = build_coldstart_data(cfg, overwrite=overwrite)
    if data_only:
        return {"data": stats}
    out = Path(cfg.coldstart.out)
    if not out.is_file() or out.stat().st_size == 0:  # every rank sees the merged file
        raise R1Error(f"r1 coldstart: no sample survived the filters (see {cfg.coldstart.out}.stats.json)")
    from r1cli.sft.loop import run_sft

    data = replace(cfg.data, train=cfg.coldstart.out, prompt_field="prompt", response_field="response")  # ROW_KEYS
    return {"data": stats, **run_sft(replace(cfg, data=data), resume=resume, overwrite=overwrite)}
