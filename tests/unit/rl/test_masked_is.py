"""Masked importance sampling (rollout.mis_low / mis_high / mis_level) against a written-out reference."""

import math

import pytest
import torch

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.rl.mismatch import mis_keep


def grids(seed=0):
    g = torch.Generator().manual_seed(seed)
    trainer = -torch.rand(4, 6, generator=g) * 3
    engine = trainer + 0.6 * torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0  # padding
    mask[3, 2:] = 0
    return trainer, engine, mask


def test_tokens_outside_the_ratio_bounds_leave_the_loss():
    trainer, engine, mask = grids()
    keep = mis_keep(trainer, engine, mask, 0.6, 1.5)
    for i in range(4):
        for j in range(6):
            ratio = math.exp(float(trainer[i, j] - engine[i, j]))
            want = 1.0 if mask[i, j] and 0.6 <= ratio <= 1.5 else 0.0
            assert keep[i, j].item() == want, (i, j, ratio)
    assert 0 < keep.sum() < mask.sum()  # both kinds of token occur


def test_the_sequence_level_judges_each_sample_by_its_geometric_mean_ratio():
    trainer, engine, mask = grids(seed=3)
    keep = mis_keep(trainer, engine, mask, 0.8, 1.25, level="sequence")
    verdicts = []
    for i in range(4):
        n = int(mask[i].sum())
        geo = math.exp(sum(float(trainer[i, j] - engine[i, j]) for j in range(n)) / n)
        inside = 0.8 <= geo <= 1.25
        verdicts.append(inside)
        assert keep[i].tolist() == [1.0 if inside and mask[i, j] else 0.0 for j in range(6)], (i, geo)
    assert any(verdicts) and not all(verdicts)


def test_the_bounds_must_hold_one():
    from r1cli.rl.loop import validate

    for bad in (["rollout.mis_low=1.2", "rollout.mis_high=2"], ["rollout.mis_low=0.5", "rollout.mis_high=0"]):
        with pytest.raises(R1Error, match="0 < mis_low < 1 < mis_high"):
            validate(load_config(None, bad))
    with pytest.raises(R1Error, match="mis_level is read only with masked importance sampling"):
        validate(load_config(None, ["rollout.mis_level=sequence"]))
    with pytest.raises(R1Error, match="reports no log-probs"):  # the transformers engine: nothing to compare with
        validate(load_config(None, ["rollout.mis_low=0.5", "rollout.mis_high=2"]))
