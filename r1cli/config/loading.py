"""Loading a configuration: defaults, YAML files, `a.b=c` overrides, every key and value checked; moved keys."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from r1cli.config.checks import check_lora, check_model_rewards, check_owned, check_ranges, check_registered
from r1cli.config.files import resolve_config
from r1cli.config.root import Config
from r1cli.errors import R1Error


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if origin in (list, dict):
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    bad = R1Error(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if tp is Any:  # a value handed on as it is (chat template variables)
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arm)
            except R1Error:
                pass
        raise bad
    if origin is list:
        if isinstance(value, str):  # `rollout.stop=</answer>` on the command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise R1Error(f"config key '{key}': {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None:
            raise bad
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


MOVED = {f"train.eval_{k}": f"eval.{k}" for k in ("every", "samples", "n", "temperature", "max_new_tokens")}
MOVED |= {"sample.require_format": "filters.require_format", "sample.filter_mixed_language": "filters.mixed_language",
          "sample.min_language_share": "filters.min_language_share", "sample.filter_code_blocks": "filters.code_blocks",
          "sample.max_paragraph_chars": "filters.max_paragraph_chars"}


# keys that moved into the sub-section of the part that reads them: the old name still works, with a note
RENAMED = {"parallel.data_parallel": "parallel.torch.data_parallel",
           "train.fused_linear": "parallel.torch.fused_linear",
           "parallel.sequence_parallel": "parallel.megatron.sequence_parallel",
           "parallel.distributed_optimizer": "parallel.megatron.distributed_optimizer"}
RENAMED |= {f"rollout.{k}": f"rollout.vllm.{k}" for k in ("gpu_memory_utilization", "kv_cache_gb", "tensor_parallel",
                                                          "weight_bucket_mb", "sleep_level", "max_model_len",
                                                          "enforce_eager")}
_noted: set[str] = set()


def _renamed(key: str) -> str:
    if key not in RENAMED:
        return key
    if key not in _noted:  # once per process
        _noted.add(key)
        sys.stderr.write(f"note: config key '{key}' moved to '{RENAMED[key]}'\n")
    return RENAMED[key]


def _with_new_names(values: Any) -> Any:
    """A root mapping ({section: {key: value}}) with moved keys under their new names."""
    if not isinstance(values, dict):
        return values
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for section, body in values.items():
        if not isinstance(body, dict):
            continue
        for k in body:
            new = _renamed(f"{section}.{k}")
            if new != f"{section}.{k}":
                value = out[section].pop(k)
                *path, leaf = new.split(".")
                node = out
                for p in path:
                    node = node.setdefault(p, {})
                    if not isinstance(node, dict):
                        raise R1Error(f"config section '{p}' must be a mapping, got {node!r}")
                node[leaf] = value
    return out


def _unknown_key(key: str, valid: list[str]) -> R1Error:
    if key in MOVED:
        return R1Error(f"config key '{key}' moved to '{MOVED[key]}'")
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return R1Error(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise R1Error(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, names)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v if v is not None else {}, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _set_path(obj: Any, path: str, raw: Any) -> None:
    """Apply one override; dict-valued fields (rewards.weights.x=1) merge by key."""
    parts = _renamed(path).split(".")
    node, prefix = obj, ""
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            break
        names = [f.name for f in dataclasses.fields(node)]
        if p not in names:
            raise _unknown_key(prefix + p, names)
        if i == len(parts) - 1:
            _apply(node, {p: raw}, prefix)
            return
        child = getattr(node, p)
        if isinstance(child, dict):
            rest = ".".join(parts[i + 1 :])
            merged = dict(child)
            merged[rest] = raw
            _apply(node, {p: merged}, prefix)
            return
        node, prefix = child, prefix + p + "."
    raise R1Error(f"config key '{path}' does not name a setting")


def load_config(path: str | list[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
                layers: list[dict] = ()) -> Config:
    """Defaults, then each YAML file in order (a later one wins), then `layers` (mappings), then overrides."""
    from r1cli.plugins import resolve_near

    cfg = Config()
    for p in [path] if isinstance(path, (str, Path)) else list(path or []):
        data = read_yaml(p)
        if isinstance(data.get("plugins"), list):  # a plugin file beside the config file that names it
            data["plugins"] = [resolve_near(str(e), resolve_config(p).parent) for e in data["plugins"]]
        apply_layer(cfg, data)
    for data in layers:
        apply_layer(cfg, data)
    apply_overrides(cfg, overrides)
    return checked(cfg)


def apply_layer(cfg: Config, data: dict) -> None:
    """Set the keys of a nested mapping ({section: {key: value}}), each checked like a file's."""
    _apply(cfg, _with_new_names(data))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    """`section.key=value` strings, values read as YAML."""
    for text in overrides:
        if "=" not in text:
            raise R1Error(f"override '{text}' must look like section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(cfg, key.strip(), value)


def checked(cfg: Config) -> Config:
    """Paths expanded, ranges and registry names checked: the last step of building a config."""
    from r1cli.plugins import load_plugins

    _expand_paths(cfg)
    check_ranges(cfg)
    load_plugins(cfg.plugins)  # before the names: a plugin registers its own
    check_registered(cfg)
    check_model_rewards(cfg)
    check_lora(cfg)
    check_owned(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a syntax error names file:line:column."""
    p = resolve_config(path)
    if not p.is_file():
        raise R1Error(f"config file not found: {path} (shipped configs: `r1 configs`)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise R1Error(f"{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise R1Error(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


PATH_KEYS = ("model.path", "data.train", "data.eval", "data.chat_template", "train.output_dir", "sample.out",
             "sample.judge", "benchmark.out", "benchmark.data_dir", "benchmark.completions", "coldstart.out",
             "coldstart.generator", "coldstart.exemplars", "distill.teacher", "rewards.model.path",
             "rewards.judge.path", "rewards.judge.template", "critic.path")


def _expand_paths(cfg: Config) -> None:
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        obj = functools.reduce(getattr, sections, cfg)
        value = getattr(obj, name)
        if value:  # ${R1_MODELS} (the presets' model folder) defaults to ./models
            value = value.replace("${R1_MODELS}", os.environ.get("R1_MODELS", "models"))
            setattr(obj, name, os.path.expandvars(os.path.expanduser(value)))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, directory: str | Path) -> Path:
    out = Path(directory) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, out)
    return out
