"""The old-policy pass left out when the update is on-policy (grpo.old_logprobs=auto): the loss with no old_logp
field is the loss with the old log-probs equal to this forward's own (values, gradients, metrics), and the pass is
left out exactly when nothing else needs it."""

import pytest
import torch

from r1cli.config import load_config
from r1cli.rl.loop import old_pass_needed
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.token_batch import TokenBatch


def _batch(lengths, old=None, **fields):
    batch = TokenBatch.from_completions([[1, 2]] * len(lengths), [[5] * n for n in lengths])
    mask = batch.scored_mask()
    batch.fields.update(advantages=torch.tensor([1.0, -0.5, 2.0, -1.5]), mask=mask, **fields)
    if old is not None:
        batch.fields["old_logp"] = old
    return batch


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_no_old_logprobs_is_the_loss_with_the_forwards_own(ratio_level):
    cfg = load_config(None, [f"grpo.ratio_level={ratio_level}", "grpo.beta=0.05", "grpo.entropy_coef=0.01"])
    torch.manual_seed(0)
    lengths = [6, 3, 5, 1]
    flat = torch.randn(sum(lengths)) * 0.3 - 2
    ref = torch.randn(4, 6) * 0.3 - 2
    entropy = torch.rand(sum(lengths))
    results = []
    for with_old in (False, True):
        logp = flat.clone().requires_grad_()
        grid = torch.zeros(4, 6)
        if with_old:  # the same values, as a separate pass would give them
            grid[_batch(lengths).scored_mask().bool()] = flat
        batch = _batch(lengths, grid if with_old else None, ref_logp=ref)
        loss = GRPOLoss(GRPOObjective.from_config(cfg.grpo, 1.0, 6), 4.0, float(sum(lengths)))
        value, sums = loss(logp, entropy, batch)
        value.backward()
        results.append((value.detach(), logp.grad, loss.finish({k: float(v) for k, v in sums.items()})))
    (v0, g0, m0), (v1, g1, m1) = results
    assert torch.equal(v0, v1) and torch.equal(g0, g1) and m0 == m1
    assert m0["clip_frac"] == 0  # a ratio of exactly 1 is never clipped


def test_the_mismatch_comes_from_the_forward_when_the_pass_is_left_out():
    lengths = [6, 3, 5, 1]
    cfg = load_config(None, [])
    logp = torch.randn(sum(lengths)) * 0.3 - 2
    engine = torch.zeros(4, 6)
    present = _batch(lengths).scored_mask().bool()
    engine[present] = logp + 0.1 * torch.randn(sum(lengths))
    loss = GRPOLoss(GRPOObjective.from_config(cfg.grpo, 1.0, 6), 4.0, float(sum(lengths)))
    _, sums = loss(logp, None, _batch(lengths, engine_logp=engine))
    out = loss.finish({k: float(v) for k, v in sums.items()})
    r = logp - engine[present]
    k3 = torch.exp(r) - r - 1  # KL(engine || trainer) per token, written out
    assert out["rollout/mismatch_kl"] == pytest.approx(float(k3.mean()), rel=1e-5)
    assert out["rollout/mismatch_kl_max"] == pytest.approx(float(k3.max()), rel=1e-5)


@pytest.mark.parametrize("settings, needed", [
    ([], False),
    (["grpo.old_logprobs=recompute"], True),
    (["grpo.mu=2"], True),
    (["grpo.mini_batch_size=8", "grpo.prompts_per_step=4", "rollout.n=4"], True),
    (["grpo.mini_batch_size=16", "grpo.prompts_per_step=4", "rollout.n=4"], False),  # the whole batch
    (["rollout.tis_cap=2"], True),
    (["grpo.beta=0.05"], False),
    (["grpo.beta=0.05", "grpo.kl_in_reward=true"], True),
    (["parallel.torch.fused_linear=one_pass"], True),
])
def test_the_pass_is_left_out_exactly_when_nothing_needs_it(settings, needed):
    assert old_pass_needed(load_config(None, settings)) is needed
