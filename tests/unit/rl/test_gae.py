"""PPO with a learned critic (grpo.advantage=gae): GAE, the clipped value loss and its trainer-facing form against
written-out references, token by token with masks (padding, and tokens a tool wrote in the middle of a row)."""

import math

import pytest
import torch

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.rl.advantages import final_token_rewards, gae
from r1cli.rl.critic import ValueLoss, WithCritic, value_loss_terms
from r1cli.rl.loop import Behaviour, Scored, add_advantages, validate
from r1cli.token_batch import TokenBatch

# 1 = a token the model wrote (an action), 0 = padding or a tool's output (stepped over)
MASK = torch.tensor([[1, 1, 1, 1, 0, 0],
                     [1, 1, 0, 0, 1, 1],
                     [1, 0, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1]], dtype=torch.float32)


def gae_by_hand(rewards, values, mask, gamma, lam):
    """Each row's action tokens in order, the recursion written out: A_k = sum_l (gamma lam)^l delta_{k+l},
    delta_k = r_k + gamma V_{k+1} - V_k, V after the last action 0."""
    adv = [[0.0] * len(row) for row in mask]
    for i, row in enumerate(mask):
        steps = [t for t, m in enumerate(row) if m]
        r = [rewards[i][t] for t in steps]
        v = [values[i][t] for t in steps] + [0.0]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(steps))]
        for k, t in enumerate(steps):
            adv[i][t] = sum((gamma * lam) ** (j - k) * deltas[j] for j in range(k, len(steps)))
    return adv


def _random(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(MASK.shape, generator=g) * MASK, torch.randn(MASK.shape, generator=g) * MASK


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_the_recursion_written_out(gamma, lam):
    rewards, values = _random(0)
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    want = torch.tensor(gae_by_hand(rewards.tolist(), values.tolist(), MASK.tolist(), gamma, lam))
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, (want + values) * MASK, rtol=1e-5, atol=1e-6)
    assert (adv[MASK == 0] == 0).all()


def test_gae_limits_monte_carlo_and_one_step():
    """lam = gamma = 1 with the reward at the end: A_t = R - V_t (Monte-Carlo); lam = 0: the one-step TD error."""
    rewards = final_token_rewards(torch.tensor([1.0, -2.0, 0.5, 3.0]), MASK)
    _, values = _random(1)
    adv, ret = gae(rewards, values, MASK, 1.0, 1.0)
    R = torch.tensor([1.0, -2.0, 0.5, 3.0]).unsqueeze(-1)
    torch.testing.assert_close(adv, (R - values) * MASK)
    torch.testing.assert_close(ret, R * MASK)  # the return of every state is the outcome
    td, _ = gae(rewards, values, MASK, 1.0, 0.0)
    # row 1: actions at 0, 1, 4, 5 - the value after token 1 is the value at token 4 (the tool's tokens skipped)
    assert td[1, 1] == pytest.approx(float(values[1, 4] - values[1, 1]))
    assert td[1, 5] == pytest.approx(float(-2.0 - values[1, 5]))


def test_final_token_rewards_sit_on_each_rows_last_action():
    r = final_token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), MASK)
    assert r.nonzero().tolist() == [[0, 3], [1, 5], [2, 0], [3, 5]]
    assert r.sum(-1).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_value_loss_clips_around_the_old_values():
    v, old, ret = torch.tensor([0.9, 0.1, 0.5, -0.4]), torch.tensor([0.5, 0.5, 0.5, 0.0]), \
        torch.tensor([1.0, 1.0, 0.0, -1.0])
    loss, clipped = value_loss_terms(v, old, ret, 0.2)
    by_hand = []
    for a, o, g in zip(v.tolist(), old.tolist(), ret.tolist()):
        vc = o + max(-0.2, min(0.2, a - o))
        by_hand.append(0.5 * max((a - g) ** 2, (vc - g) ** 2))
    torch.testing.assert_close(loss, torch.tensor(by_hand))
    # tokens 0 and 3 moved toward their returns past the clip: the clipped (larger) term holds them back
    assert clipped.tolist() == [True, False, False, True]
    plain, _ = value_loss_terms(v, old, ret, 0.0)
    torch.testing.assert_close(plain, 0.5 * (v - ret) ** 2)
    assert not torch.allclose(plain, loss)  # the clip changes the numbers: the test can tell


def test_value_loss_is_the_global_token_mean_and_its_gradient():
    """Two micro-batches of one mini-batch, each normalised by the whole mini-batch's tokens: their losses and head
    gradients add up to the whole one's, which equals the formula written out."""
    torch.manual_seed(0)
    batch = TokenBatch.from_completions([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10, 11], [12, 13, 14, 15]])
    mask = batch.scored_mask()
    batch.fields.update(old_values=torch.randn(mask.shape) * mask, returns=torch.randn(mask.shape) * mask,
                        value_mask=mask * torch.tensor([[1.0], [0.0], [1.0]]))  # the second sample weighs 0
    n = float(batch.fields["value_mask"].sum())
    hidden = torch.randn(int(mask.sum()), 8)
    head = torch.randn(1, 8, requires_grad=True)
    whole, sums = ValueLoss(0.2, n).from_hidden(hidden, head, batch, None, None)
    g_whole, = torch.autograd.grad(whole, head)
    present = mask.bool()
    v = (hidden @ head.t()).squeeze(-1)
    per, _ = value_loss_terms(v, batch.fields["old_values"][present], batch.fields["returns"][present], 0.2)
    want = (per * batch.fields["value_mask"][present]).sum() / n
    torch.testing.assert_close(whole, want)
    torch.testing.assert_close(g_whole, torch.autograd.grad(want, head)[0])
    rows = [0, 1], [2]
    cut = [int(mask[list(r)].sum()) for r in rows]
    parts = [ValueLoss(0.2, n).from_hidden(h, head, batch.select(list(r)), None, None)[0]
             for r, h in zip(rows, hidden.split(cut))]
    torch.testing.assert_close(sum(parts), whole)
    assert sums["tokens"] == n
    metrics = ValueLoss(0.2, n).finish({k: float(x) for k, x in sums.items()})
    assert math.isfinite(metrics["critic/explained_var"]) and metrics["critic/value_loss"] == pytest.approx(
        float(whole.detach()))


def test_add_advantages_runs_gae_over_the_critics_values():
    cfg = load_config(None, ["grpo.advantage=gae", "rollout.n=1", "grpo.prompts_per_step=4", "critic.lam=0.9",
                             "critic.whiten=false", "grpo.beta=0.1", "grpo.kl_in_reward=true"])
    lengths = [3, 5, 2, 4]
    batch = TokenBatch.from_completions([[1, 2]] * 4, [[5] * n for n in lengths])
    mask = batch.scored_mask()
    g = torch.Generator().manual_seed(3)
    values, kl = torch.randn(mask.shape, generator=g) * mask, torch.rand(mask.shape, generator=g) * mask
    batch.fields["old_values"] = values
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    scored = Scored(scores=None, rewards=rewards.clone(), lengths=torch.tensor(lengths),
                    truncated=torch.zeros(4, dtype=torch.bool))
    add_advantages(batch, scored, Behaviour(None, None, kl), cfg)
    token_r = final_token_rewards(rewards, mask) - 0.1 * kl  # the KL as a reward on every token
    want = torch.tensor(gae_by_hand(token_r.tolist(), values.tolist(), mask.tolist(), 1.0, 0.9))
    torch.testing.assert_close(batch.fields["advantages"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.fields["returns"], (want + values) * mask, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch.fields["value_mask"], mask)


def test_gae_runs_a_group_of_one_and_refuses_what_it_cannot_train():
    validate(load_config(None, ["grpo.advantage=gae", "rollout.n=1"]))  # a critic is the baseline
    with pytest.raises(R1Error, match="rollout.n must be at least 2"):
        validate(load_config(None, ["rollout.n=1"]))
    for extra, match in [(["parallel.backend=megatron"], "parallel.backend=torch"),
                         (["model.lora.rank=4"], "model.lora"),
                         (["rollout.n=1", "grpo.drop_equal_groups=true"], "every group")]:
        with pytest.raises(R1Error, match=match):
            validate(load_config(None, ["grpo.advantage=gae", *extra]))
    with pytest.raises(R1Error, match="read only with grpo.advantage=gae"):
        load_config(None, ["critic.lr=1e-5"])


def test_a_checkpoint_without_a_critic_is_refused(tmp_path):
    with pytest.raises(R1Error, match="holds no critic"):
        WithCritic(object(), object()).load(tmp_path)


def test_a_resume_with_other_critic_settings_is_another_run(tmp_path):
    """The critic's section and its starting weights are part of what a run's results depend on."""
    from r1cli.run.harness import run_identity

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = ["grpo.advantage=gae", f"model.path={model}"]
    one = run_identity(load_config(None, base))
    assert run_identity(load_config(None, [*base, "critic.lr=1e-4"])) != one
    other = tmp_path / "critic"
    other.mkdir()
    (other / "config.json").write_text('{"other": 1}')
    assert "critic.path (content)" in run_identity(load_config(None, [*base, f"critic.path={other}"]))
