"""`r1 pipeline`: DeepSeek-R1's stages in order, each stage's output feeding the next.

A pipeline file has three parts:

    pipeline:  output_dir, seed, prepare (tiny: build the tiny model and synthetic data when missing), report
    base:      config keys every stage starts from (model, data, rollout, eval, ...)
    stages:    a list of {name, command, config, model_from, data_from}

Command-line overrides: `section.key=value` for every stage (a model.path or data.train there is the base's:
the wiring below still applies), `NAME:section.key=value` for one stage (wins over everything).

`command` is coldstart, rl, sample, sft or distill. A stage starts from the model of `model_from` (a stage
name, or "base" for base.model.path; default: the latest earlier stage that made a model) and reads the data
of `data_from` (default for sft and distill: the previous stage's rejection samples or cold-start data; other
stages read base's data). Its outputs
go under pipeline.output_dir/NAME. Keys a stage's own config sets are never rewired.

A finished stage leaves NAME/stage.json; a re-run skips it. An interrupted stage continues: training resumes
from its newest checkpoint, sampling from its finished-prompt index.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1cli.config import CONFIG_DIR, Config, apply_layer, apply_overrides, checked, load_config, read_yaml
from r1cli.errors import R1Error, RunInterrupted
from r1cli.interfaces import build_parallel
from r1cli.models.loading import resolve_device
from r1cli.run import checkpoint as ckpt
from r1cli.run import folder_lock
from r1cli.run.checkpoint import write_text_atomic
from r1cli.run.console import console
from r1cli.run.identity import check as identity_check
from r1cli.run.identity import of_config
from r1cli.run.identity import write as write_identity
from r1cli.run.metrics import read_metrics

DEFAULT = CONFIG_DIR / "tiny" / "r1.yaml"
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAKES_MODEL = {"coldstart", "rl", "sft", "distill"}
MAKES_DATA = {"coldstart": ("coldstart", "out"), "sample": ("sample", "out")}


@dataclass
class Stage:
    name: str
    command: str
    config: dict = field(default_factory=dict)
    model_from: str = ""
    data_from: str = ""


@dataclass
class Pipeline:
    output_dir: str
    stages: list[Stage]
    base: dict = field(default_factory=dict)
    seed: int = 0
    prepare: str = "none"  # tiny: build the tiny model and synthetic arithmetic when they are missing
    report: bool = True


def read_pipeline(path: str | Path) -> Pipeline:
    raw = read_yaml(path)
    unknown = set(raw) - {"pipeline", "base", "stages"}
    if unknown:
        raise R1Error(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; a pipeline has pipeline, base, stages")
    head = raw.get("pipeline") or {}
    bad = set(head) - {"output_dir", "seed", "prepare", "report"}
    if bad:
        raise R1Error(f"{path}: unknown pipeline key(s) {', '.join(sorted(bad))} (output_dir, seed, prepare, report)")
    stages, seen = [], []
    for k, s in enumerate(raw.get("stages") or []):
        if not isinstance(s, dict) or set(s) - {"name", "command", "config", "model_from", "data_from"}:
            raise R1Error(f"{path}: stage {k + 1} must be a mapping of name, command, config, model_from, data_from")
        st = Stage(**s)
        if isinstance(st.config, str):  # a config file of its own: beside the pipeline file, or a shipped one
            found = [c for c in (Path(path).parent / st.config, Path(st.config), CONFIG_DIR / st.config) if c.is_file()]
            if not found:
                raise R1Error(f"{path}: stage '{st.name}': config file {st.config} not found (looked beside the "
                              f"pipeline file, in {Path.cwd()} and among the shipped configs)")
            st.config = read_yaml(found[0]) or {}
        if not isinstance(st.config, dict) or not isinstance(raw.get("base") or {}, dict):
            raise R1Error(f"{path}: stage '{st.name}': config must be a mapping of config sections or a config file "
                          f"name, got {type(st.config).__name__}")
        if st.command not in RUNNERS:
            raise R1Error(f"{path}: stage '{st.name}' has command '{st.command}'; known: {', '.join(RUNNERS)}")
        if not st.name or st.name in seen or st.name == "base":
            raise R1Error(f"{path}: stage {k + 1} needs a unique name other than 'base', got '{st.name}'")
        if not STAGE_NAME.fullmatch(st.name):  # a name is a folder under pipeline.output_dir, never a path
            raise R1Error(f"{path}: stage name '{st.name}' must be letters, digits, '.', '_' or '-' (it names a "
                          "folder under pipeline.output_dir)")
        for ref in (st.model_from, st.data_from):
            if ref and ref != "base" and ref not in seen:
                raise R1Error(f"{path}: stage '{st.name}' reads from '{ref}', which is not an earlier stage")
        seen.append(st.name)
        stages.append(st)
    if not stages:
        raise R1Error(f"{path}: no stages")
    p = Pipeline(stages=stages, base=raw.get("base") or {}, **head)
    check_head(p, str(path))
    return p


def check_head(p: Pipeline, where: str) -> None:
    if p.prepare not in ("none", "tiny"):
        raise R1Error(f"{where}: pipeline.prepare is none or tiny, not {p.prepare!r}")


def _has(config: dict, section: str, key: str) -> bool:
    return isinstance(config.get(section), dict) and key in config[section]


def stage_configs(p: Pipeline, overrides: list[str]) -> list[Config]:
    """Each stage's merged config: base, its own keys, the wiring to earlier stages, then the overrides
    (`section.key=value` for every stage, `NAME:section.key=value` for one)."""
    out, models, datas = [], {"base": None}, {}
    root = Path(p.output_dir)
    for i, st in enumerate(p.stages):
        d = root / st.name
        wiring = {"train": {"output_dir": str(d)}}
        if st.command == "sample":
            wiring["sample"] = {"out": str(d / "samples.jsonl")}
        if st.command == "coldstart":
            wiring["coldstart"] = {"out": str(d / "data.jsonl")}
        source = st.model_from or next((s.name for s in reversed(p.stages[:i]) if s.command in MAKES_MODEL), "base")
        if source != "base" and not _has(st.config, "model", "path"):
            wiring["model"] = {"path": models[source]}
        feed = st.data_from or (p.stages[i - 1].name if i and st.command in ("sft", "distill")
                                and p.stages[i - 1].command in MAKES_DATA else "")
        if feed and not _has(st.config, "data", "train"):
            if feed not in datas:
                raise R1Error(f"stage '{st.name}' reads data from '{feed}', which makes none")
            wiring["data"] = {"train": datas[feed]}
        mine = [o.split(":", 1)[1] for o in overrides if o.split("=", 1)[0].startswith(f"{st.name}:")]
        common = [o for o in overrides if ":" not in o.split("=", 1)[0]]
        cfg = Config()  # base, the stage's keys, overrides for all, the wiring, overrides for this stage
        for layer in ({"train": {"seed": p.seed}}, p.base, st.config):
            apply_layer(cfg, layer)
        apply_overrides(cfg, common)
        apply_layer(cfg, wiring)
        apply_overrides(cfg, mine)
        cfg = checked(cfg)
        out.append(cfg)
        if st.command in MAKES_MODEL:
            models[st.name] = str(Path(cfg.train.output_dir) / "hf")
        if st.command in MAKES_DATA:
            section, key = MAKES_DATA[st.command]
            datas[st.name] = getattr(getattr(cfg, section), key)
    names = {st.name for st in p.stages}
    for o in overrides:
        key = o.split("=", 1)[0]
        if ":" in key and key.split(":", 1)[0] not in names:
            raise R1Error(f"override '{o}' names no stage (stages: {', '.join(names)})")
    return out


def _stage_identity(cfg: Config) -> dict:
    return of_config(cfg, ["model", "data", "train", "optim", "grpo", "rewards", "rollout", "distill", "sample",
                           "filters", "coldstart"],
                     {"model.path": cfg.model.path, "data.train": cfg.data.train,
                      "distill.teacher": cfg.distill.teacher,
                      "coldstart.generator": cfg.coldstart.generator})


def _resume_flags(cfg: Config) -> dict:
    """Continue an interrupted training stage from its newest checkpoint; one that died before any
    checkpoint starts over (there is nothing to lose)."""
    run_dir = Path(cfg.train.output_dir)
    if ckpt.completed(run_dir):
        return {"resume": True}
    return {"overwrite": any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl"))}


def _run_coldstart(cfg, **kw):
    from r1cli.coldstart.loop import run_coldstart

    return run_coldstart(cfg, **kw)


def _run_rl(cfg, **kw):
    from r1cli.rl.loop import run_rl

    return run_rl(cfg, **kw)


def _run_sft(cfg, **kw):
    from r1cli.sft.loop import run_sft

    return run_sft(cfg, **kw)


def _run_distill(cfg, **kw):
    from r1cli.distill.loop import run_distill

    return run_distill(cfg, **kw)


def _run_sample(cfg, **kw):
    from r1cli.sample.loop import run_sample

    return run_sample(cfg)  # continues from its own index


RUNNERS = {"coldstart": _run_coldstart, "rl": _run_rl, "sample": _run_sample, "sft": _run_sft,
           "distill": _run_distill}


def prepare_tiny(cfg: Config, seed: int) -> None:
    """The tiny model and synthetic arithmetic (noisy worked solutions) at base's paths, when missing."""
    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate, split_held_out
    from r1cli.models.tiny import TinySpec, build_tiny_model

    if not Path(cfg.model.path).exists():
        console.print(f"building the tiny model in {cfg.model.path}")
        build_tiny_model(cfg.model.path, TinySpec(seed=seed))
    if not Path(cfg.data.train).exists() or (cfg.data.eval and not Path(cfg.data.eval).exists()):
        console.print(f"writing synthetic arithmetic to {cfg.data.train} and {cfg.data.eval}")
        train, held = split_held_out(generate("arithmetic", 4200, seed=seed, digits=2, ops="+", answer_noise=0.5),
                                     200)
        write_jsonl(train, cfg.data.train)
        if cfg.data.eval:
            write_jsonl(held, cfg.data.eval)


def _accuracy(run_dir: Path) -> float | None:
    try:
        found = [m["eval/accuracy"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in m]
    except OSError:
        return None
    return found[-1] if found else None


def run_pipeline(path: str | Path | None, overrides: list[str]) -> list[dict]:
    p = read_pipeline(path or DEFAULT)
    head = [o for o in overrides if o.startswith("pipeline.")]
    for o in head:
        key, value = o.split("=", 1)
        name = key.removeprefix("pipeline.")
        if name not in ("output_dir", "seed", "prepare", "report"):
            raise R1Error(f"unknown pipeline key '{key}' (pipeline.output_dir, seed, prepare, report)")
        import yaml

        setattr(p, name, yaml.safe_load(value))
    check_head(p, "the command line")
    rest = [o for o in overrides if o not in head]
    configs = stage_configs(p, rest)
    base = load_config(None, [o for o in rest if ":" not in o.split("=", 1)[0]],
                       layers=[p.base, {"train": {"seed": p.seed}}])
    # under torchrun every rank runs every stage; the pipeline's own files are written by rank 0 alone, and the
    # ranks meet before each decision that reads them
    par = build_parallel(resolve_device(base.train.device).type)
    if p.prepare == "tiny" and par.is_main:
        prepare_tiny(base, p.seed)
    root = Path(p.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if par.is_main:  # one pipeline per folder (each stage also holds its own)
        folder_lock.hold(root, "pipeline.output_dir")
    par.barrier()
    results = []
    base_acc = root / "base.json"
    if base.data.eval and not base_acc.is_file():  # the starting point, for the table at the end
        from r1cli.eval.accuracy import model_accuracy

        accuracy = model_accuracy(base)  # a collective over the data-parallel ranks
        if par.is_main:
            write_text_atomic(base_acc, json.dumps(accuracy))
        par.barrier()
    for st, cfg in zip(p.stages, configs):
        marker = Path(cfg.train.output_dir) / "stage.json"
        # the content fingerprints are read once, by the rank that records and checks them
        record, identity = marker.with_name("stage.identity.json"), _stage_identity(cfg) if par.is_main else {}
        if marker.is_file():
            if par.is_main:  # skipped only if made from the same model, data and settings
                identity_check(record, identity, f"stage {st.name} ({cfg.train.output_dir})",
                               f"delete {cfg.train.output_dir} to run the stage again with them (later stages too, "
                               "as they start from its output), or set pipeline.output_dir to a new folder")
                console.print(f"[bold]{st.name}[/] ({st.command}): done earlier, skipped")
            results.append(json.loads(marker.read_text()))
            continue
        if par.is_main:
            console.print(f"[bold]{st.name}[/] ({st.command}) -> {cfg.train.output_dir}")
        t0 = time.perf_counter()
        flags = {} if st.command == "sample" else _resume_flags(cfg)
        try:
            result = RUNNERS[st.command](cfg, **flags) or {}
        except RunInterrupted as e:  # the stage's own hint says --resume: the pipeline continues by itself
            raise RunInterrupted(str(e).replace("continue with --resume", "run the same r1 pipeline command again "
                                                "to continue"), e.signum) from None
        if "stopped_at" in result:  # checkpoint.stop_after: the stage is not finished; a re-run continues it
            console.print(f"{st.name} stopped after step {result['stopped_at']}; run the pipeline again to continue")
            return results
        run_dir = Path(cfg.train.output_dir)
        out = {"stage": st.name, "command": st.command, "model": cfg.model.path, "seconds": round(time.perf_counter()
                                                                                                   - t0, 1)}
        if st.command in MAKES_MODEL:
            out["made_model"] = str(run_dir / "hf")
            out["eval/accuracy"] = _accuracy(run_dir)
        if st.command in MAKES_DATA:
            section, key = MAKES_DATA[st.command]
            out["made_data"] = getattr(getattr(cfg, section), key)
        if par.is_main:
            write_identity(record, identity)
            write_text_atomic(marker, json.dumps(out, indent=1))
        par.barrier()
        results.append(out)
    if par.is_main:
        _summary(p, results, base_acc)
    return results


def _within(path: str, root: str | Path) -> str:
    """A path inside the pipeline's folder, relative to it (the table's title names the folder); others as given."""
    if not path:
        return path
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path


def _summary(p: Pipeline, results: list[dict], base_acc: Path) -> None:
    from rich.table import Table

    table = Table(title=f"r1 pipeline ({p.output_dir}; paths below are relative to it)")
    for col in ("stage", "command", "from", "made", "held-out accuracy", "s"):
        table.add_column(col, overflow="fold")  # a long path wraps in a narrow terminal instead of being cut
    if base_acc.is_file():
        table.add_row("base", "", "", "", f"{json.loads(base_acc.read_text())['eval/accuracy']:.3f}", "")
    for r in results:
        acc = r.get("eval/accuracy")
        made = r.get("made_model") or r.get("made_data", "")
        table.add_row(r["stage"], r["command"], _within(r["model"], p.output_dir), _within(made, p.output_dir),
                      "" if acc is None else f"{acc:.3f}", str(r["seconds"]))
    console.print(table)
    if p.report:
        from r1cli.run.report import write_report

        for r in results:
            if r.get("made_model"):
                write_report(str(Path(r["made_model"]).parent))
        console.print(f"reports: {p.output_dir}/*/report.html")
