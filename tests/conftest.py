"""Shared fixtures: a tiny real HF model folder and synthetic data, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; the
# variable is read when a kernel is defined, so it must be set before kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every collective r1 calls in the tests' processes asserts that its tensor sits on the device the process group
# serves (backends/parallel.py): on gloo the CPU takes any tensor, NCCL would refuse a CPU one
os.environ.setdefault("R1_CHECK_COLLECTIVES", "1")

from r1cli.data.records import write_jsonl
from r1cli.data.synth import generate, split_held_out

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from r1cli.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    train, held = split_held_out(generate("arithmetic", 4200, seed=0, digits=2, ops="+"), 200)
    write_jsonl(train, d / "train.jsonl")
    write_jsonl(held, d / "eval.jsonl")
    return d / "train.jsonl", d / "eval.jsonl"


# tiny models of each megatron family: 4 query heads in 2 key/value groups of 2, 2 layers, so that every TP=2 x PP=2
# split is exercised
FAMILY_SPECS = {"llama-untied": dict(family="llama", tie_word_embeddings=False),
                "qwen2-bias-tied": dict(family="qwen2"),
                "qwen3-qknorm-untied": dict(family="qwen3", tie_word_embeddings=False)}


def build_family_model(folder: Path, name: str) -> Path:
    """A tiny HF folder of FAMILY_SPECS[name] with random non-zero biases and norms, so that a mixed-up copy of
    one of them cannot pass a comparison."""
    from safetensors.torch import save_file

    from r1cli.backends.megatron.convert import TensorFolder
    from r1cli.models.tiny import TinySpec, build_tiny_model

    path = build_tiny_model(folder, TinySpec(**FAMILY_SPECS[name]))
    files = TensorFolder(path)
    tensors = {n: files.get(n) for n in files.where}
    g = torch.Generator().manual_seed(1)
    for n, t in tensors.items():
        if n.endswith(".bias") or "norm" in n:
            tensors[n] = torch.randn(t.shape, generator=g)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def run_r1(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `r1` entry point in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", "from r1cli.cli import run; run()", *args],
                          capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)


def assert_learns(run_dir: Path, gain: float = 0.25) -> None:
    """The tiny R1-Zero bar: held-out accuracy at the last evaluation beats the first by `gain`."""
    from r1cli.run.metrics import read_metrics

    before, after = [m["eval/accuracy"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in m]
    assert after - before >= gain, (before, after)


def torchrun(nproc: int, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "r1cli.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def cold_start(tiny_model, tmp_path_factory):
    """A short SFT on worked arithmetic whose final answers are wrong half the time (the tiny R1-Zero start)."""
    return make_cold_start(tiny_model, tmp_path_factory.mktemp("rl"))


def make_cold_start(tiny_model: Path, d: Path) -> Path:
    """d/train.jsonl, d/eval.jsonl and the SFT'd model in d/sft/hf."""
    from r1cli.config import load_config
    from r1cli.sft.loop import run_sft

    train, held = split_held_out(generate("arithmetic", 4200, seed=0, digits=2, ops="+", answer_noise=0.5), 200)
    write_jsonl(train, d / "train.jsonl")
    write_jsonl(held, d / "eval.jsonl")
    cfg = load_config("configs/tiny/sft.yaml", [
        f"model.path={tiny_model}", f"data.train={d / 'train.jsonl'}", "data.eval=",
        f"train.output_dir={d / 'sft'}", "train.steps=500", "logging.progress=false", "logging.tensorboard=false"])
    run_sft(cfg)
    return d
