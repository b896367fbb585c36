"""An out-of-memory costs a split, not the run: a micro-batch that runs out of memory (injected on the CPU by
R1_FAULT_OOM=STEP:MICRO_BATCH[:RANK]) is halved and this rank's share of the step runs again; the run finishes with
the losses of a run without it, and train/oom_splits says where it happened. What cannot be split is one line."""

import re

import pytest
from conftest import run_r1, torchrun

from r1cli.run.metrics import read_metrics

SFT = ["sft", "--config", "configs/tiny/sft.yaml", "data.eval=", "train.steps=3", "train.micro_batch_size=4",
       "train.grad_accum=2", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
       "checkpoint.export_hf=false"]


def _rows(out, key):
    return [m[key] for m in read_metrics(out / "metrics.jsonl") if key in m]


@pytest.mark.parametrize("rank", [pytest.param(0, marks=pytest.mark.slow), 1])  # (the other rank: -m slow)
def test_an_out_of_memory_on_one_rank_costs_a_split_and_the_same_losses(tiny_model, arith_data, tmp_path, rank):
    common = [*SFT, f"model.path={tiny_model}", f"data.train={arith_data[0]}"]
    plain = torchrun(2, *common, f"train.output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    hit = torchrun(2, *common, f"train.output_dir={tmp_path / 'hit'}", env={"R1_FAULT_OOM": f"2:1:{rank}"})
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert _rows(tmp_path / "hit", "train/oom_splits") == [0.0, 1.0, 0.0]
    assert _rows(tmp_path / "plain", "train/oom_splits") == [0.0, 0.0, 0.0]
    for key in ("loss", "grad_norm"):
        assert _rows(tmp_path / "hit", key) == pytest.approx(_rows(tmp_path / "plain", key), rel=1e-5), key


def test_a_sample_that_does_not_fit_alone_is_one_line(tiny_model, arith_data, tmp_path):
    proc = run_r1(*SFT, f"model.path={tiny_model}", f"data.train={arith_data[0]}", "train.micro_batch_size=1",
                  f"train.output_dir={tmp_path / 'run'}", env={"R1_FAULT_OOM": "1:0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"a sample of \d+ tokens does not fit in memory on cpu even alone; to make it fit: "
                     r"model.gradient_checkpointing=true .*parallel.context_parallel=2", last), last
    assert "Traceback" not in proc.stderr


def test_under_fsdp_an_out_of_memory_is_one_line(tiny_model, arith_data, tmp_path):
    common = [*SFT, f"model.path={tiny_model}", f"data.train={arith_data[0]}", "parallel.torch.data_parallel=fsdp",
              f"train.output_dir={tmp_path / 'run'}"]
    proc = torchrun(2, *common, env={"R1_FAULT_OOM": "1:0:0"})
    assert proc.returncode != 0
    assert re.search(r"error: out of memory on cpu in a micro-batch of 4 rows, \d+ tokens \(under FSDP or context "
                     "parallelism the other ranks wait inside its collectives", proc.stderr), proc.stderr[-3000:]
