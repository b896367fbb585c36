"""rollout.asynchronous: step k+1's samples are generated while step k trains, by weights one update behind."""

import pytest
import torch
from test_rl import _curve, rl_config

from r1cli.errors import R1Error
from r1cli.rl import loop
from r1cli.rl.loop import run_rl
from r1cli.run.metrics import read_metrics

ASYNC = ["data.eval=", "grpo.prompts_per_step=4", "rollout.n=4", "checkpoint.export_hf=false",
         "rollout.asynchronous=true", "rollout.tis_cap=2.0", "optim.lr=3e-3"]


def test_samples_are_one_update_old_and_the_loss_is_the_off_policy_objective(cold_start, tmp_path, monkeypatch):
    """For every step k > 0: the log-probs the engine reports for its samples are those of the weights the trainer
    had before update k - 1 (and not before update k), and the step's loss is, computed here by hand,
    seq-mean-token-mean of -A_i min(p_k / p_(k-1), cap) - the ratio to the current weights is 1 at the update's
    start - with A_i the group advantages."""
    from r1cli.backends.torch_trainer import TorchTrainer

    generated, advantages, records = [], [], []
    real_build, real_adv, real_step = loop.build_engine, loop.group_advantages, TorchTrainer.train_step

    def build(*a, **k):
        engine = real_build(*a, **k)
        gen = engine.generate

        def recorded(prompts, params):
            out = gen(prompts, params)
            generated.append([c for g in out for c in g])
            return out

        engine.generate = recorded
        return engine

    def adv(*a, **k):
        advantages.append(real_adv(*a, **k))
        return advantages[-1]

    def step(self, batch, loss):
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        behaviour = batch.fields["mask"].clone() * 0
        for i, c in enumerate(generated[len(records)]):
            behaviour[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        current = self.logprobs(batch)
        before = None
        if records:  # the previous step's starting weights, put back for a moment
            self.model.load_state_dict(records[-1]["weights"], strict=False)
            before = self.logprobs(batch)
            self.model.load_state_dict(weights, strict=False)
        out = real_step(self, batch, loss)
        records.append(dict(weights=weights, behaviour=behaviour, current=current, before=before,
                            mask=batch.fields["mask"].clone(), loss=out["loss"]))
        return out

    monkeypatch.setattr(loop, "build_engine", build)
    monkeypatch.setattr(loop, "group_advantages", adv)
    monkeypatch.setattr(TorchTrainer, "train_step", step)
    run_rl(rl_config(cold_start, tmp_path / "run", *ASYNC, "train.steps=4"))
    assert len(records) == 4 and len(generated) == 4
    metrics = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    for k, r in enumerate(records):
        mask = r["mask"]
        if k == 0:  # the first step's samples come from its own starting weights
            torch.testing.assert_close(r["behaviour"] * mask, r["current"] * mask, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(r["behaviour"] * mask, r["before"] * mask, rtol=0, atol=1e-5)
            assert ((r["behaviour"] - r["current"]).abs() * mask).max() > 1e-3  # and the weights did move
        w = torch.exp(r["current"] - r["behaviour"]).clamp(max=2.0)
        per_token = -advantages[k][:, None] * w * mask
        hand = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        assert r["loss"] == pytest.approx(float(hand), rel=1e-4, abs=1e-6), k
    assert metrics[0]["rollout/mismatch_kl"] < 1e-6 < metrics[-1]["rollout/mismatch_kl"]


def test_an_asynchronous_run_resumes_exactly(cold_start, tmp_path):
    """A checkpoint keeps the next step's samples (generated before it by the weights before the last update), so a
    run stopped after step 3 and resumed is the uninterrupted one."""
    run_rl(rl_config(cold_start, tmp_path / "full", *ASYNC, "train.steps=6"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *ASYNC, "train.steps=6", "checkpoint.stop_after=3"))
    assert (tmp_path / "cut" / "checkpoints" / "step_00000003" / "carry_rank0.pt").is_file()
    run_rl(rl_config(cold_start, tmp_path / "cut", *ASYNC, "train.steps=6"), resume=True)
    for key in ("loss", "reward/total", "rollout/mismatch_kl", "rollout/staleness", "grad_norm"):
        assert _curve(tmp_path / "cut", key) == _curve(tmp_path / "full", key), key


@pytest.mark.slow  # opt-in since the default run passed 15 minutes; the objective test stays
def test_the_tiny_run_learns_from_one_step_old_samples(cold_start, tmp_path):
    """The tiny R1-Zero settings (32 prompts x 8 samples a step, lr 3e-4), asynchronous with TIS: the accuracy reward
    of steps 25-32 is well above that of the first five (measured on this cold start 0.28 -> 0.50; the synchronous
    run 0.28 -> 0.52, one step ahead: each update sees samples one update older)."""
    run_rl(rl_config(cold_start, tmp_path / "run", "data.eval=", "checkpoint.export_hf=false", "train.steps=32",
                     "rollout.asynchronous=true", "rollout.tis_cap=2.0"))
    acc = [v for _, v in _curve(tmp_path / "run", "reward/accuracy")]
    assert len(acc) == 32 and sum(acc[-8:]) / 8 >= sum(acc[:5]) / 5 + 0.15, acc


@pytest.mark.parametrize("key", ["rollout.asynchronous=true", "rollout.max_staleness=2", "rollout.partial=true"])
def test_commands_that_only_generate_refuse_asynchronous_rollouts(tmp_path, key):
    from r1cli.config import load_config
    from r1cli.eval.run import EvalRequest
    from r1cli.sample.loop import run_sample

    cfg = load_config(None, [key, f"sample.out={tmp_path / 'out.jsonl'}"])
    with pytest.raises(R1Error, match=f"{key.split('=')[0]} overlaps .* r1 sample only generates: drop it"):
        run_sample(cfg)
    with pytest.raises(R1Error, match="r1 eval only generates: drop it"):
        EvalRequest.from_config(cfg)


def test_asynchronous_rollouts_need_tis_and_data_parallelism(cold_start, tmp_path):
    with pytest.raises(R1Error, match="rollout.asynchronous trains on samples generated one update earlier"):
        run_rl(rl_config(cold_start, tmp_path / "a", "rollout.asynchronous=true"))
    with pytest.raises(R1Error, match="cannot share samples across the ranks of a tensor- or pipeline-parallel"):
        run_rl(rl_config(cold_start, tmp_path / "b", *ASYNC, "parallel.backend=megatron",
                         "parallel.tensor_parallel=2"))
