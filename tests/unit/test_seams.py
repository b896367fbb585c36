"""The seams are declared: a loss says what it consumes and the trainer hands it that; engines say what they report;
kernels depend on nothing above them."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from r1cli.config import GRPOConfig, load_config
from r1cli.errors import R1Error
from r1cli.interfaces import LossInput, choose_loss_input, engine_reports_logprobs
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.sft.loss import NLLLoss

ALL = frozenset(LossInput)


def _grpo(ratio_level: str = "token") -> GRPOLoss:
    return GRPOLoss(GRPOObjective.from_config(GRPOConfig(ratio_level=ratio_level), 1.0, 16), 4.0, 16.0)


class WholeDistributions:  # what logit distillation declares
    inputs = (LossInput.HIDDEN,)


def test_the_trainer_hands_each_loss_what_it_declares():
    assert choose_loss_input(_grpo(), ALL, one_pass=False, backend="torch") is LossInput.LOGPROBS
    assert choose_loss_input(_grpo(), ALL, one_pass=True, backend="torch") is LossInput.WEIGHTED_TERMS
    assert choose_loss_input(NLLLoss(10), ALL, one_pass=True, backend="torch") is LossInput.WEIGHTED_TERMS
    # sequence-level ratios (GSPO) need whole rows: no per-token weights before the forward; asked for, that is an
    # error rather than a silent fallback
    assert choose_loss_input(_grpo("sequence"), ALL, one_pass=False, backend="torch") is LossInput.LOGPROBS
    with pytest.raises(R1Error, match="parallel.torch.fused_linear=one_pass needs per-token loss weights"):
        choose_loss_input(_grpo("sequence"), ALL, one_pass=True, backend="torch")
    assert choose_loss_input(WholeDistributions(), ALL, one_pass=False, backend="torch") is LossInput.HIDDEN
    # a backend that only hands out log-probs (megatron's vocabulary shards)
    only = frozenset({LossInput.LOGPROBS})
    assert choose_loss_input(_grpo(), only, one_pass=True, backend="megatron") is LossInput.LOGPROBS
    with pytest.raises(R1Error, match="WholeDistributions needs whole output distributions .* parallel.backend="
                                      "megatron does not hand to a loss; use parallel.backend=torch"):
        choose_loss_input(WholeDistributions(), only, one_pass=False, backend="megatron")


def test_grpo_loss_names_a_missing_batch_field():
    from r1cli.token_batch import TokenBatch

    batch = TokenBatch.from_completions([[1, 2]], [[3, 4]])
    with pytest.raises(KeyError, match="reads batch fields advantages, mask; this batch lacks advantages, mask"):
        import torch

        _grpo()(torch.zeros(2), None, batch)


def test_engines_declare_whether_they_report_logprobs():
    assert not engine_reports_logprobs("hf") and engine_reports_logprobs("vllm")
    assert not engine_reports_logprobs("auto")  # no GPU here: auto is transformers
    cfg = load_config("configs/tiny/zero.yaml", ["rollout.tis_cap=2"])
    from r1cli.rl.loop import validate

    with pytest.raises(R1Error, match="rollout.tis_cap .* the hf engine reports no log-probs of its own"):
        validate(cfg)


ALLOWED_IN_KERNELS = {"torch", "triton", "r1cli.errors", "r1cli.kernels"}


def test_kernels_depend_on_nothing_above_them():
    """kernels/ imports torch, Triton, the standard library, itself and the one-line error type - no loop, config,
    objective or backend (they pass what a kernel needs as arguments, typed by kernels/records.py)."""
    import sys

    bad = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names:
                    continue
                if not any(name == a or name.startswith(a + ".") for a in ALLOWED_IN_KERNELS):
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_no_file_points_at_the_deleted_backends_base():
    assert not (ROOT / "backends" / "base.py").exists()
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "r1cli").rglob("*.py"),
                 *(ROOT / "backends").rglob("*.py")]:
        assert "backends/base.py" not in Path(path).read_text(), path
