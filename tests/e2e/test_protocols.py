"""The GRPO and SFT loops driven by a fake trainer and a fake engine written from the protocols alone
(tests/fakes.py): this pins the seams the Megatron and vLLM backends implement, and tests the variant
switches for their effect on what reaches the trainer."""

import json
import math

import fakes
import pytest
import torch
from conftest import ROOT

from r1cli.config import load_config
from r1cli.data.records import write_jsonl
from r1cli.rl.loop import run_rl
from r1cli.run.metrics import read_metrics
from r1cli.sft.loop import run_sft


@pytest.fixture(autouse=True)
def registered():
    fakes.register()
    yield
    fakes.unregister()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": f"q{i}", "answer": "7", "response": "7777"} for i in range(16)], path)
    return path


def fake_config(prompts, out, *extra):
    return load_config(None, [
        "model.path=unused", f"data.train={prompts}", "data.template=plain", "parallel.backend=fake",
        "rollout.engine=fake", "rollout.n=4", "rollout.max_new_tokens=6", "grpo.prompts_per_step=8",
        "grpo.beta=0", "rewards.weights={sevens: 1.0}", "optim.lr=20.0", "train.steps=3", f"train.output_dir={out}",
        "logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0", *extra])


def test_rl_loop_on_fakes_learns_syncs_weights_and_resumes(prompts, tmp_path):
    result = run_rl(fake_config(prompts, tmp_path / "full", "train.steps=40"))
    trainer, engine = fakes.INSTANCES["trainer"], fakes.INSTANCES["engine"]
    # the engine samples from its own copy: it saw every update, and ends on the trainer's weights
    assert engine.loads == 1 + 40 and torch.equal(engine.theta, trainer.theta)
    curve = [m["reward/sevens"] for m in read_metrics(tmp_path / "full" / "metrics.jsonl") if "reward/sevens" in m]
    assert sum(curve[-5:]) / 5 > 0.3 > 3 * sum(curve[:5]) / 5, curve
    assert math.isfinite(result["loss"]) and (tmp_path / "full" / "hf" / "theta.pt").is_file()

    short = ["train.steps=6", "grpo.beta=0.1"]
    run_rl(fake_config(prompts, tmp_path / "a", *short))
    run_rl(fake_config(prompts, tmp_path / "b", *short, "checkpoint.stop_after=2"))
    run_rl(fake_config(prompts, tmp_path / "b", *short), resume=True)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time") and "per_s" not in k}  # noqa: E731
    a = [strip(m) for m in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [strip(m) for m in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b and [m["step"] for m in a] == list(range(1, 7))
    assert a[0]["kl"] == 0.0 and a[-1]["kl"] > 0  # reference loaded and used (beta > 0)


def test_sft_loop_on_fakes(prompts, tmp_path):
    run_sft(fake_config(prompts, tmp_path, "train.steps=5", "train.micro_batch_size=2", "train.grad_accum=2",
                        "optim.lr=1.0", "logging.every=1"))
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert losses[0] == pytest.approx(-torch.log_softmax(fakes.initial_logits(), -1)[ord("7")].item() * 4 / 5
                                      - torch.log_softmax(fakes.initial_logits(), -1)[fakes.EOS].item() / 5)
    assert losses[-1] < 0.5 * losses[0]
    # two micro-batches of two rows per optimizer step: the trainer cuts them, the loop hands it four rows
    assert [c["rows"] for c in fakes.INSTANCES["trainer"].calls[:2]] == [4, 4]


def _rewards_of(call, fn):
    return torch.tensor([fn(fakes.FakeTokenizer().decode(c), {}, None) for c in call["completions"]])


def test_drop_equal_groups_removes_exactly_those_groups(prompts, tmp_path):
    run_rl(fake_config(prompts, tmp_path, "rewards.weights={first_char_odd: 1.0}", "grpo.drop_equal_groups=true"))
    dropped = kept = 0
    for call in fakes.INSTANCES["trainer"].calls:
        groups = _rewards_of(call, fakes.first_char_odd).view(-1, 4)
        equal = (groups == groups[:, :1]).all(-1)
        weight = call["fields"]["loss_weight"].view(-1, 4)
        assert torch.equal(weight, (~equal).float().unsqueeze(-1).expand_as(weight))
        assert (call["fields"]["mask"].view(-1, 4, call["fields"]["mask"].shape[-1])[equal] == 0).all()
        dropped, kept = dropped + int(equal.sum()), kept + int((~equal).sum())
    assert dropped > 0 and kept > 0  # both cases occurred


def test_overlong_filter_zeroes_exactly_the_truncated_samples(prompts, tmp_path):
    run_rl(fake_config(prompts, tmp_path, "grpo.overlong_filter=true"))
    seen = set()
    for call in fakes.INSTANCES["trainer"].calls:
        truncated = torch.tensor([len(c) == 6 and c[-1] != fakes.EOS for c in call["completions"]])
        assert torch.equal(call["fields"]["loss_weight"], (~truncated).float())
        seen |= set(truncated.tolist())
    assert seen == {True, False}


def test_mu_two_takes_two_steps_per_batch_off_policy_on_the_second(prompts, tmp_path):
    run_rl(fake_config(prompts, tmp_path, "grpo.mu=2"))
    calls = fakes.INSTANCES["trainer"].calls
    assert len(calls) == 3 * 2  # two optimizer steps per rollout batch
    for first, second in zip(calls[::2], calls[1::2]):
        assert first["max_log_ratio"] == 0.0  # on-policy: ratio exactly 1
        assert second["max_log_ratio"] > 1e-3  # after one update the ratio moved


def test_mini_batches_split_the_batch_into_optimizer_steps(prompts, tmp_path):
    run_rl(fake_config(prompts, tmp_path, "grpo.mini_batch_size=8"))
    calls = fakes.INSTANCES["trainer"].calls
    assert [c["rows"] for c in calls] == [8] * (3 * 4)  # 32 samples per step in four optimizer steps


def _torchrun_fake(nproc, out, *extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_PROMPTS_DIR": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "tests" / "fake_worker.py"), "rl", "model.path=unused", "data.template=plain",
           "parallel.backend=fake", "rollout.engine=fake", "rollout.n=4", "rollout.max_new_tokens=6",
           "grpo.prompts_per_step=8", "grpo.beta=0", "rewards.weights={sevens: 1.0}", "optim.lr=20.0",
           "train.steps=3", f"train.output_dir={out}", "logging.progress=false", "logging.tensorboard=false",
           "logging.sample_every=0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tensor_parallel_ranks_see_the_same_prompts_and_metrics_reduce_over_data_parallel(prompts, tmp_path):
    """4 gloo processes as TP=2 x DP=2 (the fake replicates its 'model' over the TP group) against DP=2: the same
    samples, metrics and steps, each prompt generated once per replica."""
    _torchrun_fake(4, tmp_path / "tp", f"data.train={prompts}", "parallel.tensor_parallel=2")
    _torchrun_fake(2, tmp_path / "dp", f"data.train={prompts}")

    def seen(run, rank):
        return [json.loads(line) for line in (tmp_path / run / f"prompts_rank{rank}.jsonl").read_text().splitlines()]

    # ranks are laid out tp-fastest: (0, 1) hold data-parallel rank 0, (2, 3) rank 1; each replica's first rank
    # generates its prompts once and shares the samples with the other (which asks its engine for none)
    assert seen("tp", 0) == seen("dp", 0) and seen("tp", 2) == seen("dp", 1)
    assert seen("tp", 0) != seen("tp", 2)
    assert all(p == [] for p in seen("tp", 1) + seen("tp", 3)) and len(seen("tp", 1)) == len(seen("tp", 0))
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time") and "per_s" not in k}  # noqa: E731
    tp = [strip(m) for m in read_metrics(tmp_path / "tp" / "metrics.jsonl")]
    dp = [strip(m) for m in read_metrics(tmp_path / "dp" / "metrics.jsonl")]
    assert len(tp) == 3 and tp == dp


EXPLOITS = ["<think>maybe \\boxed{7}</think>", "<think>x</think><answer>\\boxed{4} or \\boxed{7}</answer>",
            "<think>x</think><answer>4</answer><answer>7</answer>", "\\boxed{4} or \\boxed{7}"]


def test_a_policy_cannot_raise_accuracy_by_exploiting_reward_holes(prompts, tmp_path, monkeypatch):
    """The policy picks among exploit completions of the right answer (7): accuracy stays 0 at every step. Given
    one honest option as well, the same loop learns to pick it, so the zero is the rewards', not the loop's."""
    def accuracy_curve(out):
        return [m["reward/accuracy"] for m in read_metrics(out / "metrics.jsonl") if "reward/accuracy" in m]

    common = ["rewards.weights={accuracy: 1.0}", "train.steps=25", "optim.lr=50.0"]
    monkeypatch.setattr(fakes.FakeEngine, "menu", EXPLOITS)
    run_rl(fake_config(prompts, tmp_path / "exploits", *common))
    assert max(accuracy_curve(tmp_path / "exploits")) == 0.0
    monkeypatch.setattr(fakes.FakeEngine, "menu", EXPLOITS + ["<think>x</think><answer>7</answer>"])
    run_rl(fake_config(prompts, tmp_path / "honest", *common))
    curve = accuracy_curve(tmp_path / "honest")
    assert curve[0] < 0.4 and sum(curve[-5:]) / 5 > 0.8, curve
