"""What every rollout engine gets from the seams, checked without vLLM: time limits on every wait, the
engine/trainer log-prob mismatch metric, truncated importance sampling, `rollout.engine: auto`, and the
one-line errors. tests/e2e/test_vllm_engine.py runs the real vLLM engine (its own environment, `-m vllm`)."""

import subprocess
import sys
import time

import fakes
import pytest
import torch
from conftest import ROOT, run_r1
from test_protocols import fake_config, prompts, registered  # noqa: F401  (fixtures)

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.interfaces import pick_engine
from r1cli.rl.loop import run_rl
from r1cli.rl.mismatch import tis_weights
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.run.deadline import Timeout, deadline
from r1cli.run.metrics import read_metrics
from r1cli.token_batch import TokenBatch


def test_a_stalled_engine_ends_the_run_with_a_message_naming_the_wait(prompts, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fakes.FakeEngine, "stall_after", 2)  # steps 1 and 2 generate; step 3 never returns
    t0 = time.monotonic()
    with pytest.raises(Timeout, match=r"timed out after 1 s waiting for the fake engine to generate 4 completions "
                                      r"for each of 8 prompts \(rollout.timeout_s sets the limit\)"):
        run_rl(fake_config(prompts, tmp_path / "run", "rollout.timeout_s=1", "train.steps=5"))
    assert time.monotonic() - t0 < 30
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "step" in m][-1] == 2


def test_a_wait_stuck_outside_python_still_ends_the_process():
    """A wait that never returns to the interpreter (signals blocked here, as in a C call) cannot be interrupted;
    the watchdog ends the process with the same message and exit status 124."""
    code = ("import signal, time\nfrom r1cli.run.deadline import deadline\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
            "with deadline(0.5, 'a test wait', 'x.timeout_s', grace_s=0.5):\n    time.sleep(60)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 124 and time.monotonic() - t0 < 20
    assert "timed out after 0.5 s waiting for a test wait (x.timeout_s sets the limit)" in proc.stderr


def test_engine_start_is_under_its_own_limit(prompts, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fakes, "create_engine", lambda *a, **k: time.sleep(3600))
    fakes.ENGINES.register("fake", fakes.create_engine)
    with pytest.raises(Timeout, match=r"waiting for the fake engine to start \(rollout.start_timeout_s"):
        run_rl(fake_config(prompts, tmp_path / "run", "rollout.start_timeout_s=1"))


def _mismatch_run(prompts, out, monkeypatch, skew, *extra):  # noqa: F811
    monkeypatch.setattr(fakes.FakeEngine, "report_logprobs", True)
    monkeypatch.setattr(fakes.FakeEngine, "skew", skew)
    run_rl(fake_config(prompts, out, "train.steps=3", *extra))
    return [m for m in read_metrics(out / "metrics.jsonl") if "step" in m]


def test_mismatch_metric_is_zero_for_the_same_weights_and_grows_with_the_difference(prompts, tmp_path,  # noqa
                                                                                      monkeypatch):
    same = _mismatch_run(prompts, tmp_path / "same", monkeypatch, 0.0)
    assert all(m["rollout/mismatch_kl_max"] < 1e-6 for m in same)
    off = _mismatch_run(prompts, tmp_path / "off", monkeypatch, 0.5)
    # the skew adds 0.5 * (id % 3) to the engine's logits: a KL of a few hundredths per token
    assert all(0.01 < m["rollout/mismatch_kl"] <= m["rollout/mismatch_kl_max"] for m in off)
    assert "rollout/tis_weight" not in off[0]
    tis = _mismatch_run(prompts, tmp_path / "tis", monkeypatch, 0.5, "rollout.tis_cap=1.2")
    assert all(0 < m["rollout/tis_capped"] < 1 and 0.5 < m["rollout/tis_weight"] <= 1.2 for m in tis)
    # same samples at step 1; the TIS run measures against its old-policy pass, the on-policy one against the
    # training forward (the same log-probs up to rounding)
    assert tis[0]["rollout/mismatch_kl"] == pytest.approx(off[0]["rollout/mismatch_kl"], rel=1e-5)
    assert [m["loss"] for m in tis] != [m["loss"] for m in off]  # the weights changed the objective


def test_tis_weights_each_tokens_policy_gradient_term_not_its_kl():
    """GRPOLoss with per-token advantages A * w equals the objective written out by hand: each token's clipped
    surrogate times min(p_trainer / p_engine, cap), plus the unweighted KL term; values and gradients."""
    torch.manual_seed(0)
    B, C, cap, beta, eps = 4, 6, 1.5, 0.05, 0.2
    lengths = [6, 3, 5, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (C - n) for n in lengths])
    old, ref, eng = (torch.randn(B, C) * 0.3 - 2 for _ in range(3))
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    logp = (old + 0.3 * torch.randn(B, C)).requires_grad_()
    w = tis_weights(old, eng, mask, cap)
    batch = TokenBatch.from_completions([[1, 2]] * B, [[5] * n for n in lengths])
    batch.fields.update(old_logp=old * mask, ref_logp=ref * mask, advantages=adv.unsqueeze(-1) * w, mask=mask)
    obj = GRPOObjective(eps_low=eps, eps_high=eps, beta=beta, kl="k3", loss_agg="token-mean")
    present = mask.bool()
    value, _ = GRPOLoss(obj, B, float(mask.sum()))(logp[present], None, batch)

    ratio = torch.exp(logp - old)
    a = adv[:, None]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    weight = torch.minimum(torch.exp(old - eng), torch.tensor(cap))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    expected = ((surrogate * weight + beta * kl) * mask).sum() / mask.sum()
    torch.testing.assert_close(value, expected)
    g1, = torch.autograd.grad(value, logp)
    g2, = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g1, g2)
    assert (w[present] < cap).any() and (w[present] == cap).any()  # both sides of the cap were exercised


def test_auto_engine_is_transformers_on_cpu_and_names_pass_through():
    assert not torch.cuda.is_available()
    assert pick_engine("auto") == "hf" and pick_engine("vllm") == "vllm" and pick_engine("hf") == "hf"


def test_tis_with_the_transformers_engine_is_one_clear_error(prompts, tmp_path):  # noqa: F811
    cfg = load_config("configs/tiny/zero.yaml", ["rollout.tis_cap=2", f"train.output_dir={tmp_path}"])
    with pytest.raises(R1Error, match="rollout.tis_cap.*hf engine"):
        run_rl(cfg)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_names_the_install(tiny_model, arith_data, tmp_path):
    train, _ = arith_data
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={tiny_model}", f"data.train={train}",
                  "data.eval=", "rollout.engine=vllm", f"train.output_dir={tmp_path / 'run'}")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "rollout.engine=vllm needs vLLM" in lines[0] and "pip install 'r1[vllm]'" in lines[0]


def test_a_deadline_inside_another_keeps_the_outer_one_running():
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="the outer wait"):
        with deadline(1.0, "the outer wait", "a.b"):
            with deadline(30.0, "the inner wait", "c.d"):
                pass
            time.sleep(10)
    assert time.monotonic() - t0 < 5


class RecordingLLM:
    """Stands in for vllm.LLM: records the memory calls in order (the sleep/wake protocol, no GPU needed)."""

    def __init__(self, log):
        self.log = log

    def sleep(self, level):
        self.log.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.log.append(f"wake_up({','.join(tags)})")

    def collective_rpc(self, fn, args):
        list(args[0])  # the weights stream is consumed by the reload
        self.log.append("reload")

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleeps_and_wakes_in_the_order_that_fits_beside_the_trainer(monkeypatch, level):
    """After a training step: the trainer's cached memory is released, then only the weights wake for the reload;
    the KV cache wakes at the next generate. Level 2 discards the weights, so generating before a reload is an
    error rather than samples from garbage weights."""
    from r1cli.backends.vllm_rollout import VLLMEngine
    from r1cli.config import RolloutConfig, VLLMEngineConfig

    log = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    engine = VLLMEngine(RecordingLLM(log), None, RolloutConfig(vllm=VLLMEngineConfig(sleep_level=level)),
                        torch.float32, torch.device("cpu"))
    engine.can_sleep = True  # as on a GPU (vLLM's CPU build has no sleep mode)
    engine.sleep()
    engine.sleep()  # asleep already: nothing more
    engine.load_weights([("w", torch.ones(2))])
    engine.wake()  # what generate does first
    engine.wake()
    assert log == [f"sleep({level})", "empty_cache", "wake_up(weights)", "reload", "reset_prefix_cache",
                   "empty_cache", "wake_up(kv_cache)"]
    engine.sleep()
    if level == 2:
        with pytest.raises(RuntimeError, match="discards its weights: load_weights must come before"):
            engine.wake()
    else:
        engine.wake()
        assert log[-2:] == ["empty_cache", "wake_up(kv_cache,weights)"]


def test_vllm_requests_are_seeded_on_the_cpu_only_by_default():
    """A seed on every request sends vLLM down its slow per-request sampler on a GPU; auto keeps the seeds (and
    with them the bit-exact, sharding-invariant CPU runs) where they cost nothing."""
    from r1cli.backends.vllm_rollout import seeds_requests

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not seeds_requests("auto", gpu) and seeds_requests("auto", cpu)
    assert seeds_requests("always", gpu) and not seeds_requests("never", cpu)


def test_a_token_budget_sizes_each_transformers_generate_call(tiny_model):
    """rollout.tokens_per_generate: as many prompts a call as keep n x (longest prompt + new tokens) within the
    budget - here 3 of 10 prompts (2 x (12 + 8) = 40 tokens each, budget 130), so 4 calls - sampling what
    rollout.prompts_per_generate=3 samples (the per-call seeds follow the same chunks)."""
    from r1cli.interfaces import SamplingParams, build_engine

    def run(*extra, rows_per_call=0):
        cfg = load_config(None, [f"model.path={tiny_model}", "rollout.engine=hf", "train.device=cpu", *extra])
        engine = build_engine(cfg.model, cfg.rollout)
        calls = []
        real = engine.model.generate
        engine.model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw)
        ids = [[5 + (i + j) % 20 for j in range(12 - i % 3)] for i in range(10)]
        out = engine.generate(ids, SamplingParams(n=2, max_tokens=8, seed=7, stop=(), rows_per_call=rows_per_call))
        return calls, [[c.completion_ids for c in g] for g in out]

    calls, by_tokens = run("rollout.tokens_per_generate=130")
    assert calls == [6, 6, 6, 2]  # rows: prompts x n
    assert run("rollout.prompts_per_generate=3")[1] == by_tokens
    # SamplingParams.rows_per_call (multi-turn continuations) sizes the calls by rows instead of prompts
    assert run("rollout.prompts_per_generate=3", rows_per_call=8)[0] == [8, 8, 4]
