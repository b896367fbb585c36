"""Packed RL micro-batches (train.max_tokens_per_micro_batch) take the same GRPO step as padded ones."""

import pytest
import torch

from r1cli.config import load_config
from r1cli.interfaces import build_trainer
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.token_batch import TokenBatch

# a long-tailed mix: mostly short completions, two long ones
LENGTHS = [1, 2, 4, 41, 3, 1, 27, 2]


def _batch(vocab: int) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (2 + b % 2,), generator=g).tolist() for b in range(len(LENGTHS))]
    completions = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    return TokenBatch.from_completions(prompts, completions)


def _step(model, tmp_path, extra: list[str], objective: GRPOObjective):
    cfg = load_config(None, [f"model.path={model}", "train.device=cpu", "train.kernels=torch", "optim.lr=0.01",
                             "optim.warmup_steps=0", "optim.schedule=constant", "train.micro_batch_size=3",
                             f"train.output_dir={tmp_path}", *extra])
    trainer = build_trainer(cfg, need_reference=True)
    batch = _batch(trainer.model.config.vocab_size)
    mask = batch.scored_mask()
    logp = trainer.logprobs(batch)
    sign = torch.tensor([1.0 if b % 3 else -1.0 for b in range(len(batch))])[:, None]
    batch.fields.update(old_logp=logp - 0.3 * sign * mask, ref_logp=trainer.logprobs(batch, "reference") + 0.1 * mask,
                        advantages=torch.tensor([1.0, -1.0] * 4), loss_weight=torch.ones(len(batch)), mask=mask)
    if trainer.train_cfg.max_tokens_per_micro_batch:  # two micro-batches; short samples share rows
        plan = trainer._micro_batches(batch)
        rows = [len(trainer._tensors(batch.select(mb))[0]) for mb in plan]
        assert len(plan) == 2 and sum(rows) < len(batch) - 2, (plan, rows)
    out = trainer.train_step(batch, GRPOLoss(objective, len(batch), float(mask.sum())))
    return logp, out, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("variant", ["token", "sequence", "one_pass"])
def test_packed_micro_batches_take_the_padded_step(tiny_model, tmp_path, variant):
    """Loss, metrics, gradient norm, updated weights and the log-probs door are those of padded micro-batches,
    for token-level ratios with the KL and entropy terms, sequence-level ratios (whole rows of one sample) and the
    one-pass fused kernel (weights known before the forward)."""
    level = "sequence" if variant == "sequence" else "token"
    objective = GRPOObjective(beta=0.04, entropy_coef=0.01, ratio_level=level,
                              loss_agg="token-mean" if variant == "one_pass" else "seq-mean-token-mean")
    extra = ["parallel.torch.fused_linear=one_pass"] if variant == "one_pass" else []
    p_logp, p_out, p_w = _step(tiny_model, tmp_path / "padded", extra, objective)
    k_logp, k_out, k_w = _step(tiny_model, tmp_path / "packed", [*extra, "train.max_tokens_per_micro_batch=64"],
                               objective)
    torch.testing.assert_close(k_logp, p_logp, rtol=0, atol=2e-5)
    assert p_out["clip_frac"] > 0.05  # the clipped branch is exercised
    for key in ("loss", "kl", "clip_frac", "entropy", "grad_norm"):
        assert k_out[key] == pytest.approx(p_out[key], rel=2e-5, abs=1e-7), key
    for name in p_w:  # one Adam step at lr 0.01: a lost gradient piece moves a weight by ~0.01, noise by < 1e-3
        torch.testing.assert_close(k_w[name], p_w[name], rtol=0, atol=1e-3, msg=name)
