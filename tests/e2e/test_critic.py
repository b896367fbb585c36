"""PPO's critic on the tiny model: a value head on a copy of the policy that learns the returns it is shown, the
memory plan's critic rows equal to what it holds (an r1 rl run with it that resumes exactly: tests/e2e/test_rl.py)."""

import torch
from test_memory_plan import _held

from r1cli.config import load_config
from r1cli.interfaces import build_critic, build_trainer
from r1cli.rl.critic import ValueLoss
from r1cli.run.memory_plan import plan
from r1cli.token_batch import TokenBatch


def _critic(tiny_model, *extra):
    cfg = load_config("configs/tiny/zero.yaml", [f"model.path={tiny_model}", "grpo.advantage=gae", "rollout.engine=hf",
                                                 "critic.lr=3e-3", "train.device=cpu", *extra])
    policy = build_trainer(cfg)
    return cfg, policy, build_critic(cfg, policy)


def test_the_critics_value_loss_falls_on_returns_it_can_learn(tiny_model):
    """Returns that depend on the tokens (+1 after token 7, -1 after token 9): the clipped value loss falls to a
    tenth, and values() then reads what training fitted."""
    cfg, policy, critic = _critic(tiny_model)
    assert critic.model.lm_head.weight.shape == (1, policy.model.lm_head.weight.shape[1])
    assert critic.model.lm_head.weight.abs().sum() == 0  # V = 0 before training
    g = torch.Generator().manual_seed(0)
    completions = [[int(t) for t in torch.randint(5, 40, (6,), generator=g)] for _ in range(16)]
    for i, c in enumerate(completions):
        c[2] = 7 if i % 2 else 9
    batch = TokenBatch.from_completions([[1, 2, 3]] * 16, completions)
    mask = batch.scored_mask()
    target = torch.tensor([1.0 if i % 2 else -1.0 for i in range(16)]).unsqueeze(-1) * (
        torch.arange(mask.shape[1]) >= 3).float() * mask  # known from the token at position 2 on
    losses = []
    for _ in range(40):
        batch.fields.update(old_values=critic.values(batch), returns=target, value_mask=mask)
        out = critic.train_step(batch, ValueLoss(0.0, float(mask.sum())))
        losses.append(out["critic/value_loss"])
    assert losses[-1] < 0.1 * losses[0], losses
    v = critic.values(batch)
    late = mask * (torch.arange(mask.shape[1]) >= 3).float()
    assert ((v - target) ** 2 * late).sum() / late.sum() < 0.1
    # the policy is untouched by the critic's training: its own head, its own optimizer
    assert policy.model.lm_head.weight.shape[0] > 1 and not policy.optimizer.state


def test_the_plan_counts_the_critic_it_holds(tiny_model):
    cfg, policy, critic = _critic(tiny_model)
    rows = dict(plan(cfg, "rl", gpus=1, device="cpu"))
    params = list(critic.loss_module.parameters())
    grads = []
    critic.optimizer.register_step_pre_hook(lambda *_: grads.append(_held(p.grad for p in params
                                                                          if p.grad is not None)))
    batch = TokenBatch.from_completions([[5, 6, 7]], [[8, 9, 10, 11]])
    mask = batch.scored_mask()
    batch.fields.update(old_values=torch.zeros_like(mask), returns=mask, value_mask=mask)
    critic.train_step(batch, ValueLoss(0.2, float(mask.sum())))
    state = [t for s in critic.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert rows["critic parameters"] == _held(params)
    assert grads == [rows["critic gradients"]] and rows["critic AdamW state"] == _held(state)
    # the tiny model ties its embeddings: the critic's head is its own [1 x hidden], not the vocabulary's
    assert rows["critic parameters"] == rows["parameters"] + 4 * policy.model.config.hidden_size
