"""The whole configuration: one section per concern."""

from __future__ import annotations

from dataclasses import dataclass, field

from r1cli.config.coldstart import ColdstartConfig
from r1cli.config.critic import CriticConfig
from r1cli.config.data import DataConfig
from r1cli.config.distill import DistillConfig
from r1cli.config.eval import BenchmarkConfig, EvalConfig
from r1cli.config.fields import owned
from r1cli.config.grpo import GRPOConfig
from r1cli.config.model import ModelConfig
from r1cli.config.parallel import ParallelConfig
from r1cli.config.rewards import RewardsConfig
from r1cli.config.rollout import RolloutConfig
from r1cli.config.sample import FilterConfig, SampleConfig
from r1cli.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig


@dataclass
class Config:
    # Python files or modules of the user's own rewards, task checkers, ... imported before the names are checked
    # (r1cli.plugins); a relative file is looked up beside the config file that names it, then where r1 runs
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # PPO's value model, read only with grpo.advantage=gae
    critic: CriticConfig = owned(CriticConfig, "grpo.advantage", ("gae",))
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    coldstart: ColdstartConfig = field(default_factory=ColdstartConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
