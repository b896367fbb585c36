"""One step each of sft, rl, LoRA and Megatron TP=2, each started from the repository root as a user starts it (the
root is sys.path[0]): what CI's unconstrained step runs against the newest dependency versions r1's bounds allow,
beside the unit tests, so that an upstream release that breaks a command shows there first (opt-in with
-m upstream: the default run covers these commands elsewhere)."""

import pytest
from conftest import run_r1, torchrun

from r1cli.run.metrics import read_metrics

pytestmark = pytest.mark.upstream

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0"]


def _steps(out):
    return [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


def rl_args(model, data, out):
    return ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={model}", f"data.train={data[0]}",
            f"data.eval={data[1]}", f"train.output_dir={out}", "train.steps=1", "grpo.prompts_per_step=4",
            "rollout.n=4", "eval.samples=4", "checkpoint.export_hf=false", *QUIET]


def test_one_sft_step(tiny_model, arith_data, tmp_path):
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}", f"data.train={arith_data[0]}",
                  "data.eval=", f"train.output_dir={tmp_path}", "train.steps=1", "logging.every=1", *QUIET,
                  env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path) == [1]


@pytest.mark.parametrize("extra", [[], ["model.lora.rank=8"]], ids=["full", "lora"])
def test_one_rl_step(tiny_model, arith_data, tmp_path, extra):
    proc = run_r1(*rl_args(tiny_model, arith_data, tmp_path), *extra, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path) == [1]


def test_one_megatron_rl_step_at_tp2(tiny_model, arith_data, tmp_path):
    proc = torchrun(2, *rl_args(tiny_model, arith_data, tmp_path), "parallel.backend=megatron",
                    "parallel.tensor_parallel=2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path) == [1]
