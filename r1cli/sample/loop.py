"""`r1 sample`: k samples per prompt from a checkpoint, keep the verified-correct ones that pass the filters.

Output (sample.out): SFT-ready JSONL rows {prompt, response, answer, task, source, sample}, usable by
`r1 sft` as they are; beside it `<out>.done` (one line per finished prompt: how many were kept and why the
others were not) and `<out>.stats.json`. Prompts are generated in fixed batches and a batch's rows are
appended before its prompts are marked done, so a run killed at any point and started again with the
same command writes exactly what an uninterrupted run writes: no duplicates, nothing missing. Under
torchrun each data-parallel rank takes its share of the prompts into files of its own.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from r1cli.config import Config
from r1cli.data.prompts import encode_prompts
from r1cli.data.records import read_records, write_jsonl
from r1cli.interfaces import SamplingParams, build_engine, build_parallel
from r1cli.models.loading import load_tokenizer
from r1cli.rewards import RewardContext, score
from r1cli.run.checkpoint import write_text_atomic
from r1cli.run.metrics import console, read_metrics
from r1cli.sample.filters import dedupe_key, rejection


def _shard(path: Path, rank: int, size: int) -> Path:
    return path if size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _resume(out: Path, index: Path) -> set[int]:
    """Prompts already finished; rows of a batch that was cut off before its prompts were marked are removed."""
    done = {r["source"] for r in read_metrics(index)} if index.is_file() else set()
    if out.is_file():
        rows = read_metrics(out)
        keep = [r for r in rows if r["source"] in done]
        if len(keep) < len(rows):
            write_jsonl(keep, out)
    return done


def run_sample(cfg: Config, overwrite: bool = False) -> dict:
    d, s = cfg.data, cfg.sample
    rows = read_records(d.train, d.max_samples, d.max_line_mb << 20)
    rows.require(d.answer_field, "data.answer_field")  # only verified samples are kept
    parallel = build_parallel()
    out = _shard(Path(s.out), parallel.dp_rank, parallel.dp_size)
    index = out.with_name(out.name + ".done")
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        out.unlink(missing_ok=True)
        index.unlink(missing_ok=True)
    done = _resume(out, index)
    engine, tokenizer = build_engine(cfg.model, cfg.rollout), load_tokenizer(cfg.model.path)
    prompts = encode_prompts(tokenizer, rows, d)
    ctx = RewardContext.from_config(d, cfg.rewards)
    mine = list(range(parallel.dp_rank, len(rows), parallel.dp_size))
    batches = [mine[i: i + s.prompts_per_batch] for i in range(0, len(mine), s.prompts_per_batch)]
    with out.open("a", encoding="utf-8") as sink, index.open("a", encoding="utf-8") as marks:
        for batch in batches:
            if all(i in done for i in batch):
                continue
            # a fixed seed per batch (its first prompt's position): a redone batch samples the same
            params = SamplingParams.from_rollout(cfg.rollout, seed=cfg.train.seed * 1_000_003 + batch[0])
            groups = engine.generate([prompts[i] for i in batch], params)
            for i, group in zip(batch, groups):
                texts = [ctx.full(c.text) for c in group]
                correct = score(texts, [rows[i]] * len(texts), {"accuracy": 1.0}, ctx).total
                reasons, seen, kept = Counter(), set(), 0
                for j, (text, ok) in enumerate(zip(texts, correct)):
                    why = "wrong answer" if ok < 1.0 else rejection(text, rows[i], ctx, s)
                    if why is None and dedupe_key(text) in seen:
                        why = "duplicate"
                    if why is None and kept >= s.keep_per_prompt:
                        why = "over keep_per_prompt"
                    if why is not None:
                        reasons[why] += 1
                        continue
                    seen.add(dedupe_key(text))
                    kept += 1
                    sink.write(json.dumps({"prompt": rows[i][d.prompt_field], "response": text,
                                           "answer": rows[i][d.answer_field], "task": rows[i].get(d.task_field),
                                           "source": i, "sample": j}, ensure_ascii=False) + "\n")
                marks_row = {"source": i, "task": rows[i].get(d.task_field) or "math", "samples": len(texts),
                             "kept": kept, "rejected": dict(reasons)}
                sink.flush()
                marks.write(json.dumps(marks_row) + "\n")
            marks.flush()
    parallel.barrier()
    return _stats(Path(s.out), parallel) if parallel.is_main else {}


def _stats(out: Path, parallel) -> dict:
    """Kept and rejected (by reason) per task over every rank's index; they add up to all samples drawn."""
    from rich.table import Table

    per_task: dict[str, Counter] = defaultdict(Counter)
    for r in range(parallel.dp_size):
        index = _shard(out, r, parallel.dp_size)
        for m in read_metrics(index.with_name(index.name + ".done")):
            c = per_task[m["task"]]
            c["prompts"] += 1
            c["samples"] += m["samples"]
            c["kept"] += m["kept"]
            for why, n in m["rejected"].items():
                c[why] += n
    stats = {task: dict(c) for task, c in per_task.items()}
    reasons = sorted({k for c in per_task.values() for k in c} - {"prompts", "samples", "kept"})
    table = Table(title=f"r1 sample ({out})")
    for col in ["task", "prompts", "samples", "kept", *reasons]:
        table.add_column(col)
    for task, c in per_task.items():
        table.add_row(task, *(str(c[k]) for k in ["prompts", "samples", "kept", *reasons]))
    write_text_atomic(out.with_name(out.name + ".stats.json"), json.dumps(stats, indent=1))
    console.print(table)
    return stats
