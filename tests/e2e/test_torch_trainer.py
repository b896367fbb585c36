"""The torch backend's contract beyond the loops: fp32 master weights, data-parallel only."""

import json
import os
import subprocess
import sys

import torch
from conftest import ROOT, run_r1

from r1cli.config import load_config
from r1cli.interfaces import build_trainer
from r1cli.models.loading import compute_dtype, param_dtype
from r1cli.sft.loss import NLLLoss
from r1cli.token_batch import TokenBatch


def test_auto_dtype_is_fp32_masters_with_bf16_compute_on_gpu():
    assert param_dtype("auto") == torch.float32
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu")) is None
    assert param_dtype("bfloat16") == torch.bfloat16 and compute_dtype("bfloat16", torch.device("cuda")) is None


def _one_step_on_norm_weights(tiny_model, tmp_path, dtype):
    """One AdamW step at lr 1e-7 (Adam's first step moves each weight by about lr): the RMSNorm weights start at
    exactly 1.0, so the update is 1e-7 of the weight. Returns the norm weights before and after."""
    cfg = load_config(None, [f"model.path={tiny_model}", f"model.dtype={dtype}", "optim.lr=1e-7",
                             "optim.weight_decay=0", "optim.grad_clip=0", "train.steps=1",
                             f"train.output_dir={tmp_path}"])
    trainer = build_trainer(cfg)
    norms = {n: p for n, p in trainer.model.named_parameters() if "norm" in n}
    before = {n: p.detach().clone() for n, p in norms.items()}
    ids = trainer.tokenizer("<think>12+34</think><answer>46</answer>", add_special_tokens=False)["input_ids"]
    batch = TokenBatch([ids], [ids[1:] + [-100]])
    trainer.train_step(batch, NLLLoss(len(ids) - 1))
    return before, {n: p.detach().clone() for n, p in norms.items()}


def test_an_update_of_1e_7_relative_size_is_not_lost(tiny_model, tmp_path):
    before, after = _one_step_on_norm_weights(tiny_model, tmp_path / "auto", "auto")
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all((b == 1.0).all() for b in before.values())
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(after.values(), before.values())])
    assert (moved > 5e-8).float().mean() > 0.9 and moved.max() < 2e-7  # kept, at the size asked for
    # the same step on bf16 parameters rounds every one of those updates away
    before, after = _one_step_on_norm_weights(tiny_model, tmp_path / "bf16", "bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(after.values(), before.values()))


def test_torch_backend_refuses_tensor_and_pipeline_parallel(tiny_model, arith_data, tmp_path):
    for key in ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"):
        proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}", key,
                      f"data.train={arith_data[0]}", f"train.output_dir={tmp_path}")
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "data parallel only" in lines[0] and key.split("=")[0] in lines[0]


def test_an_engine_from_configs_alone_follows_the_trainer_through_load_weights(tiny_model, tmp_path):
    """`r1 sample` / `r1 eval` build an engine without a trainer; a colocated one that holds its own copy is
    refreshed with (HF name, tensor) pairs: after a large step both give the trainer's own greedy output."""
    from r1cli.interfaces import SamplingParams, build_engine

    cfg = load_config("configs/tiny/zero.yaml", [f"model.path={tiny_model}", "optim.lr=0.05", "train.steps=1",
                                                 f"train.output_dir={tmp_path}"])
    own = build_engine(cfg.model, cfg.rollout)  # no trainer: loads the model folder itself
    trainer = build_trainer(cfg)
    shared = build_engine(cfg.model, cfg.rollout, trainer)  # the trainer's live module
    prompt = [trainer.tokenizer("Compute 12 + 34.", add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12)
    before = own.generate(prompt, greedy)[0][0].completion_ids
    assert before == shared.generate(prompt, greedy)[0][0].completion_ids
    ids = prompt[0] + before
    for _ in range(3):
        trainer.train_step(TokenBatch([ids], [[-100] * (len(prompt[0]) - 1) + [3] * len(before) + [-100]]),
                           NLLLoss(len(before)))
    after = shared.generate(prompt, greedy)[0][0].completion_ids
    assert after != before and own.generate(prompt, greedy)[0][0].completion_ids == before
    own.load_weights(trainer.named_weights())
    assert own.generate(prompt, greedy)[0][0].completion_ids == after


def test_fsdp_ranks_other_than_0_read_no_weights_and_hold_only_their_shard(tiny_model, tmp_path):
    """Under FSDP no rank holds the whole model: rank 0 reads the files (into CPU memory), the others build on the
    meta device and receive their shards; the sharded model (policy and reference) equals the files, and stays
    sharded after a log-prob pass."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1_CHECK_COLLECTIVES": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(ROOT / "tests" / "fsdp_load_worker.py"), str(tiny_model), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["reads"] == ["auto", "auto"] and r1["reads"] == []  # policy and reference, rank 0 only
    assert r0["local"] + r1["local"] == r0["total"] and r1["local"] < r1["total"]
    assert r0["weights_equal"] and r0["buffers_equal"] and r1["buffers_equal"]
    for r in (r0, r1):  # issue 40, finding 8: the roots (embeddings, lm_head) resharded after no_grad passes
        assert r["policy_sharded_after_logprobs"] and r["reference_sharded_after_logprobs"]


def test_an_engines_own_copy_leaves_the_accelerator_while_the_trainer_runs():
    """Under FSDP a transformers engine holds its own copy: asleep (the trainer's turn) it is moved to host memory
    and back on waking; the trainer's shared module and a CPU engine are never moved."""
    from r1cli.backends.hf_rollout import HFGenerateEngine
    from r1cli.config import RolloutConfig

    class Recording(torch.nn.Linear):
        moves: list = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    gpu = HFGenerateEngine(Recording(2, 2), None, RolloutConfig(), torch.device("cuda", 3))
    gpu.sleep()
    gpu.sleep()  # once only
    gpu.wake()
    gpu.wake()
    assert Recording.moves == ["cpu", "cuda:3"]
    Recording.moves.clear()
    for engine in (HFGenerateEngine(Recording(2, 2), None, RolloutConfig(), torch.device("cuda", 0), shared=True),
                   HFGenerateEngine(Recording(2, 2), None, RolloutConfig(), torch.device("cpu"))):
        engine.sleep()
        engine.wake()
    assert Recording.moves == []
