"""The shipped YAML configs: where they are, and how a name on the command line finds one."""

from __future__ import annotations

from pathlib import Path

from r1cli.errors import R1Error


def _configs_folder() -> Path:
    """The folder of the shipped YAML: `configs/` of a checkout, or `r1cli/configs` inside an installed wheel."""
    import importlib.util

    spec = importlib.util.find_spec("r1cli.configs")
    if spec is None or not spec.submodule_search_locations:
        raise R1Error("the shipped configs (package r1cli.configs) are missing from this install; reinstall r1")
    return Path(next(iter(spec.submodule_search_locations)))


CONFIG_DIR = _configs_folder()  # presets: students/, tiny/, the pipelines


def resolve_config(path: str | Path) -> Path:
    """A config file named on the command line: a path that exists from the working folder wins; otherwise
    `configs/X.yaml` (or `X.yaml`) is looked up among the shipped configs, so they resolve after `pip install .`."""
    p = Path(path)
    if p.exists():
        return p
    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    if not p.is_absolute() and (CONFIG_DIR / rel).is_file():
        return CONFIG_DIR / rel
    return p


def shipped_configs() -> list[str]:
    """Every shipped config as `configs/...` (the name --config takes from any folder)."""
    return sorted(f"configs/{f.relative_to(CONFIG_DIR).as_posix()}" for f in CONFIG_DIR.rglob("*.yaml"))
