"""Checks across keys, run once a configuration is built (ranges, registry names, owners, combinations)."""

from __future__ import annotations

import dataclasses
from typing import Any

from r1cli.config.rewards import RewardModelConfig
from r1cli.config.root import Config
from r1cli.errors import R1Error


def _leaves(obj: Any, prefix: str = ""):
    """(key, field, value) for every setting of a config tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def check_ranges(cfg: Any) -> None:
    """Every bounded number lies in its range (declared with the field)."""
    for key, f, value in _leaves(cfg):
        if isinstance(value, str):  # a number's named alternative (train.max_tokens_per_micro_batch: auto)
            continue
        low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
        if low is not None and (value <= low if above else value < low):
            raise R1Error(f"config key '{key}': {value!r} is out of range (must be {'>' if above else '>='} {low})")
        if high is not None and value > high:
            raise R1Error(f"config key '{key}': {value!r} is out of range (must be <= {high})")


def _setting(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_owned(cfg: Any) -> None:
    """A sub-section read by one backend or engine (owned(...)) is refused when set for another: silently
    ignoring it is the bug users spend days on."""
    _check_owned(cfg, cfg, "")


def _check_owned(obj: Any, root: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        key = f"{prefix}{f.name}"
        if "owner" in f.metadata:
            owner, readers = f.metadata["owner"]
            chosen = _setting(root, owner)
            if chosen not in readers:
                default = f.default_factory()
                changed = [g.name for g in dataclasses.fields(value)
                           if getattr(value, g.name) != getattr(default, g.name)]
                if changed:
                    reader = "|".join(r for r in readers if r != "auto")
                    raise R1Error(f"config key '{key}.{changed[0]}' is read only with {owner}={reader}; this run "
                                  f"has {owner}={chosen} (drop the key, or set {owner}={reader})")
        _check_owned(value, root, key + ".")


def check_model_rewards(cfg: Config) -> None:
    """A model reward with a weight needs its model; rewards.model is read by the reward_model reward only, so
    setting it without that weight is refused (rewards.judge also serves r1 sample and r1 eval)."""
    for name, section in (("reward_model", "model"), ("judge", "judge")):
        used, path = name in cfg.rewards.weights, getattr(cfg.rewards, section).path
        if used and not path:
            raise R1Error(f"rewards.weights.{name} needs rewards.{section}.path (a local model folder)")
    if "reward_model" not in cfg.rewards.weights and cfg.rewards.model != RewardModelConfig():
        raise R1Error("rewards.model is read only by the reward_model reward; this run has no "
                      "rewards.weights.reward_model (give it a weight, or drop rewards.model)")


def check_lora(cfg: Config) -> None:
    """model.lora runs on the torch backend, with the base model as the fixed reference."""
    if not cfg.model.lora.rank:
        return
    if cfg.parallel.backend == "megatron":
        raise R1Error("model.lora runs on the torch backend (peft adapters on transformers models); "
                      "parallel.backend=megatron does not take it: set parallel.backend=torch or model.lora.rank=0")
    outside = sorted({"lm_head", "embed_tokens"} & set(cfg.model.lora.target_modules))
    if outside:  # the fused losses read lm_head's weight directly: an adapter there would be silently left out
        raise R1Error(f"model.lora.target_modules: {', '.join(outside)} cannot take adapters (the loss reads the "
                      "output layer's weight itself); adapt the decoder's projections (the default, or all-linear)")
    if cfg.grpo.ref_update_every:
        raise R1Error("model.lora: the reference is the base model (the adapters switched off), which does not "
                      "follow the policy: grpo.ref_update_every must be 0")


def check_generate_only(cfg: Config, command: str) -> None:
    """What a command that only generates (r1 sample, r1 eval) would ignore: generating ahead of a trainer."""
    r = cfg.rollout
    for key, on in (("rollout.asynchronous", r.asynchronous), ("rollout.max_staleness", r.max_staleness),
                    ("rollout.partial", r.partial)):
        if on:
            raise R1Error(f"{key} overlaps r1 rl's generation with its training; r1 {command} only generates: "
                          "drop it")


def check_registered(cfg: Any) -> None:
    """Every registry-backed key names a registered entry (dict keys for dict fields)."""
    import importlib

    for key, f, value in _leaves(cfg):
        if "registry" in f.metadata:
            module, attr = f.metadata["registry"].split(":")
            registry = getattr(importlib.import_module(module), attr)
            for name in value if isinstance(value, (dict, list)) else [value]:
                registry.check(name, key)
