"""`r1 eval`: sample k completions per benchmark problem (or read existing ones), score them, report.

Outputs in --out: samples.jsonl (one line per sample: prompt, completion, extracted answer,
verdict, reason; appended as problems finish, so a restart skips what is done), summary.json and
a table of pass@1 (mean over k samples), pass@k and cons@k, each with a 95% bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from r1cli.config import Config, DataConfig, JudgeRewardConfig, ModelConfig, RolloutConfig, check_generate_only
from r1cli.data.records import read_records, write_jsonl
from r1cli.data.templates import render_prompt
from r1cli.errors import R1Error
from r1cli.eval.benchmarks import (
    Problem,
    call_test,
    load_benchmark,
    normalise,
    program_jobs,
    score_code,
    score_text,
)
from r1cli.eval.metrics import summarise
from r1cli.models import lora
from r1cli.rewards import RewardContext
from r1cli.run import folder_lock
from r1cli.run.append_log import AppendLog, cut_torn_tail
from r1cli.run.checkpoint import write_text_atomic
from r1cli.run.console import console
from r1cli.run.identity import check as identity_check
from r1cli.run.identity import fingerprint
from r1cli.run.metrics import read_metrics
from r1cli.seeds import batch_seed


@dataclass(frozen=True)
class EvalRequest:
    benchmarks: tuple[str, ...]
    out: str
    model: str = ""
    completions: str = ""
    data_dir: str = ""
    samples: int = 1
    temperature: float = 0.6  # DeepSeek-R1's evaluation settings
    top_p: float = 0.95
    max_new_tokens: int = 2048
    template: str = "chat"
    prefill: str = ""
    limit: int = 0  # problems per benchmark; 0: all
    seed: int = 0
    code_workers: int = 0  # sandbox pool size; 0: twice the cores
    engine: str = "hf"  # a registered rollout engine
    rollout: RolloutConfig | None = None  # the engine settings (rollout.vllm, prompts_per_generate, timeouts)
    judge: JudgeRewardConfig | None = None  # grades the `judged` benchmark (rewards.judge)

    @classmethod
    def from_config(cls, cfg: Config) -> "EvalRequest":
        lora.refuse(cfg.model.lora, "eval")
        check_generate_only(cfg, "eval")
        b = cfg.benchmark
        return cls(tuple(b.benchmarks), b.out, model=cfg.model.path, completions=b.completions,
                   data_dir=b.data_dir, samples=b.samples, temperature=b.temperature, top_p=b.top_p,
                   max_new_tokens=b.max_new_tokens, template=cfg.data.template, prefill=cfg.data.prefill,
                   limit=b.limit, seed=b.seed, code_workers=b.code_workers, engine=cfg.rollout.engine,
                   rollout=cfg.rollout, judge=cfg.rewards.judge if cfg.rewards.judge.path else None)


def _load(req: EvalRequest) -> tuple[dict[str, list[Problem]], dict[str, str]]:
    """The problems of each benchmark (the first --limit), and each benchmark's content hash (all its problems)."""
    out, hashes = {}, {}
    for spec in req.benchmarks:
        problems = load_benchmark(spec, req.data_dir or None)
        name = spec.partition("=")[0]
        out[name] = problems[: req.limit] if req.limit else problems
        text = json.dumps([dataclasses.asdict(p) for p in problems], sort_keys=True, default=str)
        hashes[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out, hashes


def _identity(req: EvalRequest, hashes: dict[str, str]) -> dict:
    """What defines the samples in --out: the model (or the completions file), each benchmark's problems and the
    sampling settings."""
    fields: dict = {f"benchmark {name} (content)": h for name, h in hashes.items()}
    if req.completions:
        return {**fields, "completions (content)": fingerprint(req.completions)}
    return {**fields, "model (content)": fingerprint(req.model), "samples": req.samples,
            "temperature": req.temperature, "top_p": req.top_p, "max_new_tokens": req.max_new_tokens,
            "template": req.template, "prefill": req.prefill, "seed": req.seed}


def _judge_of(req: EvalRequest):
    if req.judge is None:
        raise R1Error("the judged benchmark needs a judge: rewards.judge.path (and its engine / template) in the "
                      "--config")
    from r1cli.rewards.model_rewards import Judge

    return Judge(req.judge, req.rollout or RolloutConfig())


def _score(problems: list[Problem], completions: list[list[str]], ctx: RewardContext, workers: int,
           judge=None) -> list[list[dict]]:
    """Verdict records per problem and sample; programs of all problems run together in the sandbox pool, and a
    judged problem's samples go to the judge together."""
    from r1cli.parsing import final_answer_of
    from r1cli.sandbox import Limits
    from r1cli.sandbox.harness import judge_many
    from r1cli.sandbox.launcher import launch_many

    records = [[{} for _ in c] for c in completions]
    jobs, owners = [], []
    judged = [(i, j) for i, (p, comps) in enumerate(zip(problems, completions)) if p.kind == "judge"
              for j in range(len(comps))]
    if judged:
        texts = [ctx.full(completions[i][j]) for i, j in judged]
        scores = judge([problems[i].prompt for i, _ in judged], texts, [problems[i].answer for i, _ in judged])
        for (i, j), text, v in zip(judged, texts, scores):
            records[i][j] = {"extracted": final_answer_of(text) or None, "correct": v >= 0.5, "score": v,
                             "reason": "judged right" if v >= 0.5 else "judged wrong"}
    calls, callers = [], []
    for i, (p, comps) in enumerate(zip(problems, completions)):
        for j, text in enumerate(comps):
            if p.kind == "judge":
                continue
            if p.kind == "humaneval":  # the test runs here; the program only answers its calls
                calls.append(call_test(p, text))
                callers.append((i, j))
            elif p.kind == "stdio":
                runs = program_jobs(p, text)
                owners.append((i, j, len(jobs), len(runs)))
                jobs += runs
            else:
                ok, ans = score_text(p, text, ctx)
                records[i][j] = {"extracted": ans, "correct": ok, "reason": "right" if ok else "wrong answer"
                                 if ans is not None else "no final answer"}
    limits = Limits(wall_s=10, cpu_s=6)
    if jobs:
        results = launch_many(jobs, limits, workers=workers or None)
        for i, j, start, n in owners:
            ok, reason = score_code(problems[i], results[start: start + n])
            records[i][j] = {"extracted": None, "correct": ok, "reason": reason}
    if calls:
        verdicts = judge_many(calls, lambda js: launch_many(js, limits, workers=workers or None))
        for (i, j), (ok, reason) in zip(callers, verdicts):
            records[i][j] = {"extracted": None, "correct": ok, "reason": reason}
    return records


def _done(path: Path, expected) -> dict[tuple[str, str], list[dict]]:
    """Problems finished by an earlier run into the same --out; a problem cut off mid-way (fewer lines than
    expected(problem key), or a torn last line) is dropped from the file and done again."""
    got: dict = defaultdict(list)
    if not path.is_file():
        return got
    cut_torn_tail(path, console.print)
    for r in read_metrics(path):
        got[(r["benchmark"], r["id"])].append(r)
    partial = [k for k, v in got.items() if len(v) < expected(k)]
    if partial:
        for k in partial:
            del got[k]
        write_jsonl([r for v in got.values() for r in v], path)
    return got


def run_eval(req: EvalRequest) -> dict:
    from r1cli.interfaces import ENGINES

    ENGINES.check(req.engine, "--engine")
    if not req.benchmarks:
        raise R1Error("name the benchmarks: --benchmarks aime24,math500 (or benchmark.benchmarks=[...])")
    if bool(req.model) == bool(req.completions):
        raise R1Error("give --model (to generate) or --completions FILE (to score existing completions)")
    from r1cli.interfaces import build_parallel

    parallel = build_parallel()
    benches, hashes = _load(req)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    if parallel.is_main:  # one writer, and never results of another model or other settings reported as these
        folder_lock.hold(out, "--out")
        identity_check(out / "identity.json", _identity(req, hashes), f"--out {out}",
                       f"write to another --out (or delete {out / 'identity.json'} to add to these results)")
    parallel.barrier()
    # each data-parallel rank scores its share of every benchmark into a file of its own
    samples_path = out / ("samples.jsonl" if parallel.dp_size == 1 else f"samples.rank{parallel.dp_rank}.jsonl")
    ctx = RewardContext(prefill=req.prefill)
    if req.completions:
        given = defaultdict(list)
        rows = read_records(req.completions)
        for i, r in enumerate(rows):
            if not isinstance(r.get("completion"), str):  # a missing completion is not a wrong one
                raise R1Error(f"{rows.where(i)}: needs completion (text), and benchmark and id; got the fields "
                              f"{', '.join(r) or 'none'}")
            given[(str(r.get("benchmark")), str(r.get("id")))].append(r["completion"])
        unknown = [k for k in given if k[0] not in benches or k[1] not in {p.id for p in benches[k[0]]}]
        if unknown:
            raise R1Error(f"{req.completions}: no problem {unknown[0][1]!r} in benchmark {unknown[0][0]!r} "
                          f"(benchmarks given: {', '.join(benches)})")
        done = _done(samples_path, lambda key: len(given.get(key, ())))
    else:
        done = _done(samples_path, lambda key: req.samples)
        engine, tokenizer = _engine(req)
    judge = _judge_of(req) if any(p.kind == "judge" for ps in benches.values() for p in ps) else None
    with AppendLog(samples_path) as log:
        for name, problems in benches.items():
            mine = problems[parallel.dp_rank:: parallel.dp_size]
            todo = [p for p in mine if (name, p.id) not in done]
            if req.completions:
                todo = [p for p in todo if (name, p.id) in given]
            for s in range(0, len(todo), 16):
                chunk = todo[s: s + 16]
                if req.completions:
                    texts = [given[(name, p.id)] for p in chunk]
                else:
                    texts = _generate(engine, tokenizer, chunk, req, problems.index(chunk[0]))
                for p, comps, recs in zip(chunk, texts, _score(chunk, texts, ctx, req.code_workers, judge)):
                    rows = [{"benchmark": name, "id": p.id, "sample": j, "prompt": p.prompt, "completion": text,
                             **rec} for j, (text, rec) in enumerate(zip(comps, recs))]
                    log.append(rows)  # a problem's samples together, in one write
                    done[(name, p.id)] += rows
    parallel.barrier()
    if parallel.dp_size > 1:  # every shard is complete: the summary reads them all
        done = defaultdict(list)
        for shard in sorted(out.glob("samples.rank*.jsonl")):
            for r in read_metrics(shard):
                done[(r["benchmark"], r["id"])].append(r)
    return _summary(benches, done, out) if parallel.is_main else {}


def _engine(req: EvalRequest):
    from r1cli.interfaces import build_engine
    from r1cli.models.loading import load_tokenizer
    from r1cli.tools.turns import with_tools

    rollout = replace(req.rollout or RolloutConfig(), engine=req.engine, n=req.samples, temperature=req.temperature,
                      top_p=req.top_p, max_new_tokens=req.max_new_tokens, stop=[])
    tokenizer = load_tokenizer(req.model)
    data = DataConfig(template=req.template, prefill=req.prefill)
    return with_tools(build_engine(ModelConfig(path=req.model), rollout), tokenizer, rollout, data), tokenizer


def _generate(engine, tokenizer, problems: list[Problem], req: EvalRequest, first: int) -> list[list[str]]:
    from r1cli.interfaces import SamplingParams
    from r1cli.tools import with_tool_schemas

    data = with_tool_schemas(DataConfig(template=req.template, prefill=req.prefill), req.rollout or RolloutConfig())
    plain = DataConfig(template="plain")
    prompts = [render_prompt(tokenizer, p.prompt, plain if p.kind == "humaneval" else data) for p in problems]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    params = SamplingParams(n=req.samples, temperature=req.temperature, top_p=req.top_p,
                            max_tokens=req.max_new_tokens, seed=batch_seed(req.seed, first))
    return [[c.text for c in group] for group in engine.generate(ids, params)]


def _summary(benches: dict[str, list[Problem]], done: dict, out: Path) -> dict:
    from rich.table import Table

    summary = {}
    table = Table(title=f"r1 eval  ({out})")
    for col in ("benchmark", "problems", "samples", "pass@1 [95% CI]", "cons@k", "pass@k"):
        table.add_column(col)
    for name, problems in benches.items():
        per = []
        for p in problems:
            recs = sorted(done.get((name, p.id), []), key=lambda r: r["sample"])
            if recs:
                per.append({"correct": [bool(r["correct"]) for r in recs],
                            "answers": [normalise(r["extracted"]) for r in recs]})
        if not per:
            continue
        k = min(len(p["correct"]) for p in per)
        metrics = summarise(per, ks=(k,) if k > 1 else (), cons=(k,) if k > 1 else ())
        summary[name] = {"problems": len(per), "samples": k, **metrics}
        fmt = lambda m: f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"  # noqa: E731
        table.add_row(name, str(len(per)), str(k), fmt(metrics["pass@1"]),
                      fmt(metrics[f"cons@{k}"]) if k > 1 else "-", fmt(metrics[f"pass@{k}"]) if k > 1 else "-")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    console.print(table)
    return summary
