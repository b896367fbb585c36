"""r1 rl end to end on the tiny model: it learns, lr=0 does not, resume and data parallel are exact."""

import math

import pytest
import torch
from conftest import torchrun

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.rl.loop import run_rl
from r1cli.run.metrics import read_metrics


def rl_config(cold_start, out, *extra):
    return load_config("configs/tiny/zero.yaml", [
        f"model.path={cold_start / 'sft' / 'hf'}", f"data.train={cold_start / 'train.jsonl'}",
        f"data.eval={cold_start / 'eval.jsonl'}", f"train.output_dir={out}", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_every=0", *extra])


def eval_curve(run_dir):
    return [m["eval/accuracy"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in m]


@pytest.fixture(scope="module")
def trained(cold_start, tmp_path_factory):
    """The full tiny R1-Zero run (80 steps), exported to hf/."""
    out = tmp_path_factory.mktemp("trained") / "rl"
    run_rl(rl_config(cold_start, out))
    return out


def test_rl_learns_and_lr_zero_does_not(cold_start, trained, tmp_path):
    before, after = eval_curve(trained)
    assert after - before >= 0.25, (before, after)
    rewards = [m["reward/accuracy"] for m in read_metrics(trained / "metrics.jsonl") if "reward/accuracy" in m]
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10 + 0.15

    run_rl(rl_config(cold_start, tmp_path / "lr0", "optim.lr=0.0", "train.steps=16"))  # nothing can move
    before0, after0 = eval_curve(tmp_path / "lr0")
    assert before0 == before  # same seeds, same starting point
    assert abs(after0 - before0) < 0.05, (before0, after0)


def _curve(run_dir, key="loss"):
    return [(m["step"], m[key]) for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


SHORT = ["train.steps=6", "data.eval=", "grpo.prompts_per_step=4", "rollout.n=4", "checkpoint.export_hf=false"]


def test_rl_resume_is_exact(cold_start, tmp_path):
    run_rl(rl_config(cold_start, tmp_path / "full", *SHORT, "grpo.beta=0.05"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT, "grpo.beta=0.05", "checkpoint.stop_after=3"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT, "grpo.beta=0.05"), resume=True)
    for key in ("loss", "reward/total", "kl", "grad_norm"):
        full, cut = _curve(tmp_path / "full", key), _curve(tmp_path / "cut", key)
        assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 7))
        assert [v for _, v in cut] == [v for _, v in full], key  # bit-exact on CPU


def test_rl_with_a_critic_resumes_exactly(cold_start, tmp_path):
    gae = ["grpo.advantage=gae", "rollout.n=2", "critic.lr=1e-3", "critic.warmup_steps=1", "grpo.mu=2",
           "grpo.mini_batch_size=4", "train.steps=4"]
    run_rl(rl_config(cold_start, tmp_path / "full", *SHORT, *gae))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT, *gae, "checkpoint.stop_after=2"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT, *gae), resume=True)
    for key in ("critic/value_loss", "critic/grad_norm", "critic/values", "reward/total"):
        full, cut = _curve(tmp_path / "full", key), _curve(tmp_path / "cut", key)
        assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 5)), key
        assert [v for _, v in cut] == [v for _, v in full], key  # bit-exact on CPU
    losses = _curve(tmp_path / "full", "loss")
    assert [s for s, _ in losses] == list(range(2, 5))  # step 1 trained the critic alone (critic.warmup_steps=1)
    assert _curve(tmp_path / "cut", "loss") == losses
    from r1cli.run.report import write_report

    assert "critic (PPO): value loss" in write_report(str(tmp_path / "full")).read_text()


# opt-in: the default run holds two RL ranks to one under FSDP with LoRA (tests/e2e/test_lora.py) and DDP through
# sft; FSDP's sharded path is also in sft, distill and the streamed loading test
@pytest.mark.slow
@pytest.mark.parametrize("dp", ["ddp", "fsdp", "fsdp-packed", "fsdp-gae"])
def test_two_ranks_match_one(cold_start, tmp_path, dp):
    """fsdp-packed: the two ranks pack their micro-batches (train.max_tokens_per_micro_batch) after dealing the
    step's rows between them by tokens (balance_ranks), against one padded rank. fsdp-gae: PPO's critic sharded
    too, its advantages whitened over both ranks' tokens, saved and resumed."""
    base = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "train.steps=3", "grpo.prompts_per_step=4",
            "rollout.n=4", "rollout.prompts_per_generate=1", "logging.progress=false", "logging.tensorboard=false",
            "logging.sample_every=0", "checkpoint.export_hf=false", "train.micro_batch_size=4",
            f"parallel.torch.data_parallel={dp.split('-')[0]}", "grpo.beta=0.05", "grpo.ref_update_every=2"]
    keys = ["reward/total", "loss", "grad_norm", "kl"]
    if dp == "fsdp-gae":
        base += ["grpo.advantage=gae", "critic.lr=1e-3"]
        keys += ["critic/value_loss", "critic/grad_norm"]
    one = torchrun(1, *base, f"train.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    if dp == "fsdp-packed":
        base.append("train.max_tokens_per_micro_batch=100")
    # two ranks, stopped after the reference refresh of step 2 and resumed: under FSDP the reference is sharded
    # too, refreshed shard by shard, and saved and loaded through its gathered state
    two = torchrun(2, *base, f"train.output_dir={tmp_path / 'two'}", "checkpoint.stop_after=2")
    assert two.returncode == 0, two.stderr[-3000:]
    two = torchrun(2, *base, f"train.output_dir={tmp_path / 'two'}", "--resume")
    assert two.returncode == 0, two.stderr[-3000:]
    for key in keys:
        a, b = _curve(tmp_path / "one", key), _curve(tmp_path / "two", key)
        assert len(a) == len(b) == 3
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("switches", [
    ["grpo.beta=0.05", "grpo.kl_estimator=k2", "grpo.ref_update_every=2"],
    ["grpo.beta=0.05", "grpo.kl_in_reward=true", "grpo.kl_estimator=k1"],
    ["grpo.ratio_level=sequence", "grpo.advantage=rloo", "grpo.entropy_coef=0.01"],
    ["grpo.loss_agg=token-mean", "grpo.eps_high=0.28", "grpo.drop_equal_groups=true", "grpo.mu=2",
     "grpo.mini_batch_size=8"],
    ["grpo.loss_agg=seq-mean-token-sum-norm", "grpo.advantage=drgrpo", "grpo.dual_clip=3.0",
     "grpo.overlong_buffer=8", "grpo.overlong_filter=true", "rollout.max_new_tokens=16"],
    ["grpo.policy_loss=cispo", "grpo.advantage=reinforce++", "grpo.beta=0.05", "grpo.kl_in_reward=true",
     "grpo.kl_estimator=k1", "grpo.mu=2"],
    ["grpo.advantage=reinforce++-baseline", "grpo.loss_agg=token-mean"],
])
def test_variants_run_and_report(cold_start, tmp_path, switches):
    run_rl(rl_config(cold_start, tmp_path, *SHORT, "train.steps=3", *switches))
    steps = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    last = steps[-1]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in steps)
    if "grpo.ref_update_every=2" in switches:
        # policy == reference at step 1; one update later they differ; refreshed after step 2
        kl = [m["kl"] for m in steps]
        assert kl[0] == 0.0 and kl[1] > 0 and kl[2] == 0.0
    if "grpo.entropy_coef=0.01" in switches:
        assert last["entropy"] > 0
    if "rollout.max_new_tokens=16" in switches:
        assert last["truncation_rate"] > 0


def test_non_finite_steps_stop_the_run(cold_start, tmp_path):
    from r1cli.rewards import REWARDS

    # finite, but past float32: the advantages are not (a NaN from a reward itself is that sample's 0)
    REWARDS.register("test_nan")(lambda completion, row, ctx: 1e308)
    try:
        with pytest.raises(R1Error, match="3 steps in a row had a non-finite"):
            run_rl(rl_config(cold_start, tmp_path, *SHORT, "rewards.weights={test_nan: 1.0}"))
    finally:
        REWARDS.unregister("test_nan")
    skipped = [m["skipped"] for m in read_metrics(tmp_path / "metrics.jsonl") if "skipped" in m]
    assert skipped == [1.0, 1.0]  # the third is the one that stops the run


def test_report_draws_the_curves(cold_start, tmp_path):
    from r1cli.run.report import write_report

    run_rl(rl_config(cold_start, tmp_path / "no_kl", *SHORT, "train.steps=2"))  # tiny/zero.yaml: beta 0
    page = write_report(str(tmp_path / "no_kl"))
    assert page.is_file() and "data:image/png;base64" in page.read_text()
    assert (tmp_path / "no_kl" / "reward.png").stat().st_size > 1000
    assert "KL to reference (β = 0: no KL)" in page.read_text()
    run_rl(rl_config(cold_start, tmp_path / "kl", *SHORT, "train.steps=2", "grpo.beta=0.05"))
    assert "no KL" not in write_report(str(tmp_path / "kl")).read_text()


# the one-pass forms are opt-in (the default run was near its 15 minutes): tests/unit/kernels holds the one-pass
# Triton kernel to its reference, and tests/e2e/test_packing.py runs the one-pass loss in a trainer
@pytest.mark.parametrize("fused_linear,loss_agg", [
    ("recompute", "seq-mean-token-mean"),
    pytest.param("one_pass", "seq-mean-token-mean", marks=pytest.mark.slow),
    pytest.param("one_pass", "token-mean", marks=pytest.mark.slow)])
def test_triton_kernels_train_like_the_reference(cold_start, tmp_path, fused_linear, loss_agg):
    """`train.kernels=triton` (interpreted on CPU) gives the same run as the plain-torch reference, with the
    logits recomputed in the backward or the gradient formed in the forward from the aggregation weights."""
    pytest.importorskip("triton")
    small = [*SHORT, "train.steps=2", "grpo.prompts_per_step=2", "grpo.beta=0.05", "grpo.entropy_coef=0.01",
             f"grpo.loss_agg={loss_agg}"]
    run_rl(rl_config(cold_start, tmp_path / "torch", *small, "train.kernels=torch"))
    run_rl(rl_config(cold_start, tmp_path / "triton", *small, "train.kernels=triton",
                     f"parallel.torch.fused_linear={fused_linear}"))
    for key in ("reward/total", "loss", "grad_norm", "kl", "entropy"):
        a, b = _curve(tmp_path / "torch", key), _curve(tmp_path / "triton", key)
        assert len(a) == len(b) == 2
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_rl_learns_with_triton_kernels(cold_start, tmp_path):
    """The full learning test through the Triton kernels (interpreted on CPU: about an hour)."""
    pytest.importorskip("triton")
    run_rl(rl_config(cold_start, tmp_path, "train.kernels=triton"))
    before, after = eval_curve(tmp_path)
    assert after - before >= 0.25, (before, after)


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_rl_in_a_log_prints_plain_progress_lines_and_a_summary(cold_start, tmp_path):
    """Not a terminal (a SLURM log): one readable line per logging step; the run ends with held-out accuracy
    before -> after and where the run is; checkpoint.stop_after says that it stopped."""
    from conftest import run_r1

    args = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", f"data.eval={cold_start / 'eval.jsonl'}", "eval.samples=8",
            "train.steps=3", "grpo.prompts_per_step=4", "rollout.n=4", "logging.sample_every=0",
            "logging.tensorboard=false"]
    proc = run_r1(*args, f"train.output_dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/3", "2/3", "3/3"] and all("reward" in ln for ln in steps)
    assert any(ln.startswith("done: 3 steps in") and "held-out accuracy" in ln and " -> " in ln
               and str(tmp_path / "a") in ln for ln in lines), proc.stderr
    proc = run_r1(*args, f"train.output_dir={tmp_path / 'b'}", "checkpoint.stop_after=2")
    assert proc.returncode == 0 and "stopped after step 2 (checkpoint.stop_after=2)" in proc.stderr


def test_r1_eval_scores_the_policy_higher_after_rl(cold_start, trained, tmp_path):
    """`r1 eval` on held-out problems, 4 samples at temperature 1: pass@1 after RL is above the cold start's,
    and their 95% bootstrap intervals do not overlap."""
    import json

    from conftest import run_r1

    def evaluate(model, out):
        proc = run_r1("eval", "--model", str(model), "--benchmarks", f"jsonl={cold_start / 'eval.jsonl'}",
                      "--limit", "80", "--samples", "4", "--temperature", "1.0", "--top-p", "1.0",
                      "--max-new-tokens", "48", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        return json.loads((out / "summary.json").read_text())["jsonl"]

    before = evaluate(cold_start / "sft" / "hf", tmp_path / "before")
    after = evaluate(trained / "hf", tmp_path / "after")
    assert before["problems"] == after["problems"] == 80 and after["samples"] == 4
    assert after["pass@1"]["ci_low"] > before["pass@1"]["ci_high"], (before["pass@1"], after["pass@1"])
    assert {"pass@4", "cons@4"} <= after.keys()


def test_an_on_policy_step_leaves_out_the_old_policy_pass_and_trains_the_same(cold_start, tmp_path, monkeypatch):
    """grpo.old_logprobs=auto (the default) runs no old-policy forward when the step's one update is on-policy;
    the run is the one that recomputes them, up to the rounding of a separate forward."""
    from r1cli.backends.torch_trainer import TorchTrainer

    calls = []
    real = TorchTrainer.logprobs

    def counted(self, batch, which="policy", temperature=1.0):
        calls.append(which)
        return real(self, batch, which, temperature)

    monkeypatch.setattr(TorchTrainer, "logprobs", counted)
    short = [*SHORT, "train.steps=4", "grpo.beta=0.05"]
    run_rl(rl_config(cold_start, tmp_path / "auto", *short))
    assert calls == ["reference"] * 4  # the KL's reference pass only
    calls.clear()
    run_rl(rl_config(cold_start, tmp_path / "recompute", *short, "grpo.old_logprobs=recompute"))
    assert calls == ["reference", "policy"] * 4
    for key in ("loss", "reward/total", "kl", "grad_norm"):
        auto, again = _curve(tmp_path / "auto", key), _curve(tmp_path / "recompute", key)
        assert [s for s, _ in auto] == [1, 2, 3, 4]
        torch.testing.assert_close(torch.tensor([v for _, v in auto]), torch.tensor([v for _, v in again]),
                                   rtol=1e-4, atol=1e-6)


def test_dynamic_sampling_refills_the_step_with_groups_that_have_signal_and_resumes_exactly(cold_start, tmp_path):
    """grpo.dynamic_sampling (DAPO): groups whose rewards are all equal are replaced by groups of further prompts
    until the step holds prompts_per_step groups with signal (or the rounds run out); the draws are a function of
    the step, so a resumed run is the uninterrupted one."""
    dyn = ["train.steps=4", "data.eval=", "grpo.prompts_per_step=8", "rollout.n=4", "checkpoint.export_hf=false",
           "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=4"]
    run_rl(rl_config(cold_start, tmp_path / "full", *dyn))
    steps = [m for m in read_metrics(tmp_path / "full" / "metrics.jsonl") if "sampling/rounds" in m]
    assert len(steps) == 4
    assert sum(m["sampling/groups_dropped"] for m in steps) > 0 and max(m["sampling/rounds"] for m in steps) > 1
    for m in steps:
        assert 1 <= m["sampling/rounds"] <= 4
        # what the step trains on: groups with signal, unless the rounds ran out (the rest weigh 0)
        assert m["zero_var_groups"] == m["sampling/groups_short"] / 8
    run_rl(rl_config(cold_start, tmp_path / "cut", *dyn, "checkpoint.stop_after=2"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *dyn), resume=True)
    for key in ("loss", "reward/total", "sampling/rounds", "sampling/groups_dropped", "grad_norm"):
        assert _curve(tmp_path / "cut", key) == _curve(tmp_path / "full", key), key


# opt-in (each a full tiny R1-Zero run): the objectives peers use, from the demo's cold start, each against its own
# lr=0 control
OBJECTIVES = {
    "cispo": ["grpo.policy_loss=cispo", "grpo.eps_low=0.2", "grpo.eps_high=0.28"],
    "reinforce++": ["grpo.advantage=reinforce++", "grpo.beta=0.01", "grpo.kl_in_reward=true",
                    "grpo.kl_estimator=k1"],
    "reinforce++-baseline": ["grpo.advantage=reinforce++-baseline"],
    # masked importance sampling needs the engine's own log-probs: one-step-off samples (the transformers engine
    # reports none), the mask beside TIS
    "mis": ["rollout.asynchronous=true", "rollout.tis_cap=2.0", "rollout.mis_low=0.5", "rollout.mis_high=2.0"],
    # PPO with a learned critic (GAE, lambda 0.95), its lr raised like the policy's for the tiny model
    "gae": ["grpo.advantage=gae", "critic.lr=3e-4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_learns_and_lr_zero_does_not(cold_start, tmp_path, name):
    run_rl(rl_config(cold_start, tmp_path / "run", *OBJECTIVES[name]))
    before, after = eval_curve(tmp_path / "run")
    assert after - before >= 0.20, (name, before, after)
    if name == "gae":  # the critic learns: its value loss over the last 20 steps below the first 20's
        v = [m["critic/value_loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
        assert sum(v[-20:]) < 0.8 * sum(v[:20]), v
    if name == "mis":  # the share of tokens masked is logged every step
        assert all(0 <= m["rollout/mis_masked"] <= 1 for m in read_metrics(tmp_path / "run" / "metrics.jsonl")
                   if "loss" in m)
    run_rl(rl_config(cold_start, tmp_path / "lr0", *OBJECTIVES[name], "optim.lr=0.0", "train.steps=16"))
    before0, after0 = eval_curve(tmp_path / "lr0")
    assert before0 == before and abs(after0 - before0) < 0.05, (name, before0, after0)
