"""Every shipped config rehearsed on the CPU (opt-in: `python -m pytest -m rehearsal`, its own CI step): each YAML
under configs/ loads, validates and runs its first two steps through the command it is written for - a pipeline's
every stage - with the model and data swapped for tiny ones of the same family, the layout shrunk to at most two
gloo processes (FSDP configs run FSDP on two), and the sizes that would take hours on a CPU shrunk (steps, prompts
and samples per step, tokens, held-out rows). Qwen2-family configs get the cold-started tiny model, so that the
generating stages have answers to keep; a pipeline's model-written cold start is kept unverified (a tiny generator
is rarely right after a reflecting pass). Every other setting - objective, clip, KL, aggregation, rewards,
template, prefill, filters, schedule, precision, checkpointing, parallel mode, engine - is the file's own."""

import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_r1, torchrun

from r1cli.config import shipped_configs
from r1cli.data.records import write_jsonl
from r1cli.run.metrics import read_metrics

pytestmark = pytest.mark.rehearsal

SIZES = ["train.steps=2", "rollout.n=2", "rollout.max_new_tokens=48", "eval.samples=4", "eval.n=1",
         "eval.max_new_tokens=48", "data.max_samples=16", "logging.progress=false", "logging.tensorboard=false",
         "checkpoint.keep=1"]


def command_of(name: str, text: str) -> str:
    raw = yaml.safe_load(text)
    if "stages" in raw:
        return "pipeline"
    if name.startswith("configs/students/"):
        return "distill"
    return "coldstart" if "coldstart" in raw else "rl" if "grpo" in raw else "sft"


def family_of(text: str) -> str:
    """The architecture the config is written for, from its model paths and comments."""
    low = text.lower()
    return "llama" if re.search(r"llama|smollm", low) else "qwen3" if "qwen3" in low else "qwen2"


@lru_cache(maxsize=None)
def tiny(family: str, root: str) -> Path:
    """A random tiny model of the family; for qwen2 (the tiny default) the cold-started one, so that generating
    stages (cold start, rejection sampling) have answers to keep."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    if family == "qwen2":
        return Path(root) / "sft" / "hf"
    return build_tiny_model(Path(root) / f"tiny-{family}", TinySpec(family=family))


@pytest.fixture(scope="module")
def data(cold_start) -> dict:
    rows = read_metrics(cold_start / "train.jsonl")[:4]
    write_jsonl([{"prompt": r["prompt"], "response": r["response"]} for r in rows], cold_start / "exemplars.jsonl")
    return {"root": cold_start, "train": cold_start / "train.jsonl", "eval": cold_start / "eval.jsonl",
            "exemplars": cold_start / "exemplars.jsonl"}


def processes(raw: dict) -> int:
    """Two gloo processes where the file asks for data-parallel sharding, one otherwise."""
    sections = [raw] + [s.get("config", {}) for s in raw.get("stages", [])] + [raw.get("base", {})]
    fsdp = any((s.get("parallel") or {}).get("torch", {}).get("data_parallel") == "fsdp" for s in sections)
    return 2 if fsdp else 1


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_runs_its_first_steps(name, data, tmp_path):
    text = (ROOT / name).read_text()
    raw = yaml.safe_load(text)
    command, model = command_of(name, text), tiny(family_of(text), str(data["root"]))
    nproc = processes(raw)
    grpo = [f"grpo.prompts_per_step={2 * nproc}", f"grpo.mini_batch_size={2 * nproc}"]
    swap = [f"model.path={model}", f"data.train={data['train']}", f"data.eval={data['eval']}"]
    if command == "pipeline":
        stages = [s["name"] for s in raw["stages"]]
        args = ["pipeline", "--config", name, f"pipeline.output_dir={tmp_path}", "pipeline.prepare=none",
                *swap, *SIZES, *grpo, "sample.prompts_per_batch=4", "coldstart.prompts_per_batch=4"]
        if any(s["command"] == "coldstart" and "generator" in s.get("config", {}).get("coldstart", {})
               for s in raw["stages"]):
            # a tiny generator's few-shot drafts after a reflecting pass are rarely right: kept unverified here
            args += [f"coldstart:coldstart.generator={model}", f"coldstart:coldstart.exemplars={data['exemplars']}",
                     "coldstart:coldstart.verify=false", "coldstart:data.max_samples=32"]
    else:
        args = [command, "--config", name, f"train.output_dir={tmp_path / 'run'}", *swap, *SIZES]
        if command == "rl":
            args += grpo
        if command == "distill":
            args = ["distill", "--student", Path(name).stem, "--data", str(data["train"]),
                    f"train.output_dir={tmp_path / 'run'}", *swap, *SIZES]
        if command == "coldstart":
            args += [f"coldstart.out={tmp_path / 'cs.jsonl'}", "coldstart.prompts_per_batch=4"]
    proc = torchrun(nproc, *args, timeout=900) if nproc > 1 else run_r1(*args, env={"OMP_NUM_THREADS": "1"},
                                                                         timeout=900)
    assert proc.returncode == 0, f"{name}: {' '.join(args)}\n{proc.stderr[-4000:]}"
    if command != "pipeline":
        assert (tmp_path / "run" / "hf" / "config.json").is_file(), name
    else:
        assert all((tmp_path / s / "stage.json").is_file() for s in stages), name
