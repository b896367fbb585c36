"""A user's own rewards, task checkers and other registered pieces, loaded from the config - no file of r1 edited.

`plugins: [my_task/rewards.py, my_pkg.rewards]` in a config imports each Python file or module before the config's
names are checked, on every process that loads the config (every rank under torchrun, `r1 sample`, `r1 eval`,
`r1 pipeline`'s stages). A plugin registers what it defines with the decorators the built-ins use
(`r1cli.rewards.reward`, `r1cli.rewards.task`). Where a config expects a registered name, `path.py:function` or
`module:function` names the function itself (imported and registered under that name on first use).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from r1cli.errors import R1Error

_LOADED: dict[str, Any] = {}  # resolved file path or module name -> its module


def is_file_ref(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def resolve_near(entry: str, folder: Path) -> str:
    """A relative plugin file named in a config file: relative to that file's folder when it exists there, else
    left as given (relative to where the command runs)."""
    if not is_file_ref(entry) or Path(entry).is_absolute():
        return entry
    near = folder / entry.split(":", 1)[0]
    if near.is_file():
        return str(near.resolve()) + (":" + entry.split(":", 1)[1] if ":" in entry else "")
    return entry


def _import_file(path: Path):
    key = str(path.resolve())
    if key in _LOADED:
        return _LOADED[key]
    if not path.is_file():
        raise R1Error(f"plugin file not found: {path}")
    name = f"r1_plugin_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # the plugin may import its sibling modules
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise R1Error(f"plugin {path} failed to import: {type(e).__name__}: {e}") from e
    _LOADED[key] = module
    return module


def _import_module(name: str):
    if name in _LOADED:
        return _LOADED[name]
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise R1Error(f"plugin module {name!r} cannot be imported ({e}); give a file path (my_task/rewards.py) or "
                      "a module on PYTHONPATH") from e
    _LOADED[name] = module
    return module


def load_plugins(entries: list[str]) -> None:
    """Import every plugin file or module (once per process)."""
    for entry in entries:
        if is_file_ref(entry):
            _import_file(Path(entry))
        else:
            _import_module(entry)


def load_reference(ref: str) -> Any:
    """The object a `path.py:attribute` or `module:attribute` reference names."""
    where, _, attr = ref.rpartition(":")
    module = _import_file(Path(where)) if is_file_ref(where) else _import_module(where)
    if not hasattr(module, attr):
        raise R1Error(f"{where} has no {attr!r} (from {ref!r})")
    return getattr(module, attr)
