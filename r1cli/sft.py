"""`r1 sft`: supervised fine-tuning on conversations, loss on assistant tokens only."""

from __future__ import annotations

import time
from pathlib import Path

from r1cli import checkpoint as ckpt
from r1cli.config import Config, save_config
from r1cli.errors import R1Error
from r1cli.evaluate import held_out_accuracy
from r1cli.metrics import MetricsLog, StepProgress, console
from r1cli.records import read_records
from r1cli.sft_data import RowSchedule, collate, pack_examples, shard_micro_batches, tokenize_rows


def build_rows(cfg: Config, tokenizer, path: str):
    examples = tokenize_rows(read_records(path, cfg.data.max_samples), tokenizer, cfg.data, path)
    return pack_examples(examples, cfg.data.max_seq_len) if cfg.data.pack else examples


def run_sft(cfg: Config, resume: bool = False) -> dict:
    from r1cli.backends.torch_trainer import TorchTrainer

    if cfg.parallel.backend != "torch":
        raise R1Error(f"parallel.backend={cfg.parallel.backend} is not available for sft yet; use torch")
    read_records(cfg.data.train, 1)  # fail on a missing data file before loading a model
    trainer = TorchTrainer(cfg)
    run_dir = Path(cfg.train.output_dir)
    if trainer.is_main:
        save_config(cfg, run_dir)
    tok = trainer.tokenizer
    rows = build_rows(cfg, tok, cfg.data.train)
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum * trainer.world_size
    schedule = RowSchedule(len(rows), per_step, t.seed, cfg.data.shuffle)
    log = MetricsLog(run_dir, trainer.is_main, cfg.logging.tensorboard, fresh=not resume)

    start = 0
    if resume:
        extra = trainer.load(ckpt.require_latest(run_dir))
        start = extra["step"]
        log.truncate_after(start)
        if trainer.is_main:
            console.print(f"resumed from step {start}")
    eval_rows = read_records(cfg.data.eval)[: t.eval_samples] if cfg.data.eval else []
    engine = None  # built at the first evaluation; under FSDP it holds a whole copy of the model

    bar = StepProgress(t.steps, start, trainer.is_main and cfg.logging.progress,
                       [("loss", "loss"), ("lr", "lr"), ("tokens_per_s", "tok/s")])
    last: dict = {}
    step = start
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        micro = shard_micro_batches(schedule.rows_for_step(step), trainer.rank, trainer.world_size, t.grad_accum)
        batches = [collate([rows[i] for i in mb], tok.pad_token_id) for mb in micro]
        out = trainer.sft_step(batches)
        dt = time.perf_counter() - t0
        last = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                "tokens_per_s": out["tokens"] / dt, "epoch": schedule.epoch_of(step + 1), "skipped": out["skipped"]}
        if (step + 1) % cfg.logging.every == 0 or step + 1 == t.steps:
            log.log(step + 1, last)
        bar.update(step + 1, last)
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps and eval_rows:  # last: below
            engine = _eval_engine(engine, trainer, cfg)
            log.log(step + 1, held_out_accuracy(trainer, engine, eval_rows, cfg))
        done = step + 1
        if ckpt.save_if_due(trainer, run_dir, cfg, done, t.steps):
            bar.close()
            return {"stopped_at": done, **last}
    bar.close()
    ckpt.save(trainer, run_dir, t.steps, cfg.checkpoint.keep)
    result = dict(last)
    if eval_rows:
        ev = held_out_accuracy(trainer, _eval_engine(engine, trainer, cfg), eval_rows, cfg)
        log.log(t.steps, ev)
        result.update(ev)
    if cfg.checkpoint.export_hf:
        trainer.export_hf(run_dir / "hf")
    log.close()
    if trainer.is_main:
        console.print(f"done: {run_dir}  " + "  ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                         if isinstance(v, float)))
    return result


def _eval_engine(engine, trainer, cfg: Config):
    """One rollout engine for the whole run, its weights refreshed before each evaluation."""
    if engine is None:
        from r1cli.backends.hf_rollout import hf_engine_for

        return hf_engine_for(trainer, cfg)  # starts from the current weights
    engine.load_weights(trainer)
    return engine
