"""Read by mypy, not by pytest (`mypy` with pyproject's [tool.mypy]): every implementation is held to the protocol of
r1cli/interfaces.py it is registered as - the real backends and engines, the losses, and the fakes the loop tests
drive. A method or attribute a caller relies on that an implementation lacks, or with another signature, fails here."""

from __future__ import annotations

from fakes import FakeEngine, FakeTrainer

from r1cli.backends.hf_rollout import HFGenerateEngine
from r1cli.backends.megatron.trainer import MegatronTrainer
from r1cli.backends.parallel import DistributedContext
from r1cli.backends.torch_trainer import TorchTrainer
from r1cli.backends.vllm_rollout import VLLMEngine
from r1cli.distill.loss import DistillLoss
from r1cli.interfaces import ParallelContext, RolloutEngine, TokenLoss, TrainerBackend
from r1cli.kernels.records import ElementwiseObjective
from r1cli.rl.critic import ValueLoss
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.sft.loss import NLLLoss


def trainers(a: TorchTrainer, b: MegatronTrainer, c: FakeTrainer) -> list[TrainerBackend]:
    return [a, b, c]


def engines(a: HFGenerateEngine, b: VLLMEngine, c: FakeEngine) -> list[RolloutEngine]:
    return [a, b, c]


def losses(a: GRPOLoss, b: NLLLoss, c: DistillLoss, d: ValueLoss) -> list[TokenLoss]:
    return [a, b, c, d]


def contexts(a: DistributedContext) -> ParallelContext:
    return a


def kernel_objective(a: GRPOObjective) -> ElementwiseObjective:
    return a
