"""Typed run configuration: dataclasses per concern, YAML files, `a.b=c` overrides.

Every key is checked: an unknown key names the closest valid one, a value of the wrong type names the key, the
value and the type it should have. One module per section (model, data, train, parallel, rollout, rewards, grpo,
eval, sample, coldstart, distill, critic), the whole in root; loading reads files and overrides, checks holds the checks
across keys, fields the helpers that declare a setting's range, registry or owner. The reference of every key:
docs/reference/config.md, generated from these dataclasses (`python docs/generate.py`).
"""

from r1cli.config.checks import (
                                 check_generate_only,
                                 check_lora,
                                 check_model_rewards,
                                 check_owned,
                                 check_ranges,
                                 check_registered,
)
from r1cli.config.coldstart import ColdstartConfig
from r1cli.config.critic import CriticConfig
from r1cli.config.data import DataConfig
from r1cli.config.distill import DistillConfig
from r1cli.config.eval import BenchmarkConfig, EvalConfig
from r1cli.config.fields import bounded, named, owned
from r1cli.config.files import CONFIG_DIR, resolve_config, shipped_configs
from r1cli.config.grpo import GRPOConfig
from r1cli.config.loading import (
                                 MOVED,
                                 PATH_KEYS,
                                 RENAMED,
                                 apply_layer,
                                 apply_overrides,
                                 checked,
                                 dump_config,
                                 load_config,
                                 read_yaml,
                                 save_config,
                                 to_dict,
)
from r1cli.config.model import LoraConfig, ModelConfig
from r1cli.config.parallel import MegatronBackendConfig, ParallelConfig, TorchBackendConfig
from r1cli.config.rewards import JudgeRewardConfig, RewardModelConfig, RewardsConfig
from r1cli.config.rollout import RolloutConfig, VLLMEngineConfig
from r1cli.config.root import Config
from r1cli.config.sample import FilterConfig, SampleConfig
from r1cli.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig

__all__ = ["BenchmarkConfig", "CONFIG_DIR", "CheckpointConfig", "ColdstartConfig", "Config", "CriticConfig",
           "DataConfig", "DistillConfig", "EvalConfig", "FilterConfig", "GRPOConfig", "JudgeRewardConfig",
           "LoggingConfig", "LoraConfig", "MOVED", "MegatronBackendConfig", "ModelConfig", "OptimConfig", "PATH_KEYS",
           "RENAMED", "ParallelConfig", "RewardModelConfig", "RewardsConfig", "RolloutConfig", "SampleConfig",
           "TorchBackendConfig", "TrainConfig", "VLLMEngineConfig", "apply_layer", "apply_overrides", "bounded",
           "check_generate_only", "check_lora", "check_model_rewards", "check_owned", "check_ranges",
           "check_registered", "checked", "dump_config", "load_config", "named", "owned", "read_yaml",
           "resolve_config", "save_config", "shipped_configs", "to_dict"]
