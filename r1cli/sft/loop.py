"""`r1 sft`: supervised fine-tuning on conversations, loss on assistant tokens only."""

from __future__ import annotations

import time

from r1cli.config import Config
from r1cli.data.records import read_data, read_records
from r1cli.data.schedule import RowSchedule, rank_share
from r1cli.data.sft_examples import pack_examples, to_token_batch, tokenize_rows
from r1cli.eval.accuracy import held_out_evaluator
from r1cli.interfaces import build_trainer
from r1cli.run.harness import RunHarness, check_run_dir
from r1cli.sft.loss import NLLLoss
from r1cli.tools import with_tool_schemas


def build_rows(cfg: Config, tokenizer, path: str):
    rows = read_data(path, cfg.data, cfg.data.max_samples)
    examples = tokenize_rows(rows, tokenizer, with_tool_schemas(cfg.data, cfg.rollout), path)
    return pack_examples(examples, cfg.data.max_seq_len) if cfg.data.pack else examples


def run_sft(cfg: Config, resume: bool = False, overwrite: bool = False, loss_for=None) -> dict:
    """`loss_for(trainer)` gives the loss of a step from its global token count (default: the NLL)."""
    check_run_dir(cfg, resume, overwrite)
    read_records(cfg.data.train, 1, cfg.data.max_line_mb << 20)  # a missing file fails before a model loads
    trainer = build_trainer(cfg, command="distill" if cfg.distill.teacher else "sft")
    make_loss = loss_for(trainer) if loss_for else NLLLoss
    p, t = trainer.parallel, cfg.train
    rows = build_rows(cfg, trainer.tokenizer, cfg.data.train)
    schedule = RowSchedule(len(rows), t.micro_batch_size * t.grad_accum * p.dp_size, t.seed, cfg.data.shuffle)
    last: dict = {}
    with RunHarness(cfg, trainer, resume=resume, overwrite=overwrite, evaluate=held_out_evaluator(cfg, trainer),
                    progress_keys=[("loss", "loss"), ("lr", "lr"), ("tokens_per_s", "tok/s"),
                                   ("moe/load_imbalance", "moe imb")]) as harness:
        for step in range(harness.start, t.steps):
            t0 = time.perf_counter()
            mine = rank_share(schedule.rows_for_step(step), p.dp_rank, p.dp_size)
            batch = to_token_batch([rows[i] for i in mine])
            tokens = p.all_reduce_sum(sum(batch.counts))
            out = trainer.train_step(batch, make_loss(tokens))
            last = {**out, "tokens_per_s": tokens / (time.perf_counter() - t0), "epoch": schedule.epoch_of(step + 1)}
            if harness.step_done(step + 1, last):
                return harness.stopped(last)
        return harness.finish(last)
