"""Name -> implementation tables at the places users extend r1.

One table defines the valid names of a config key: config validation reads it, and
an unknown name is one line listing the valid ones. Entries may be given as
"module:attribute" strings, imported on first use, so that naming a backend never
imports torch.distributed, megatron or vllm before it is chosen. Where a config names
an entry, `path.py:function` or `module:function` names a user's object directly
(r1cli.plugins).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

from r1cli.errors import R1Error


class Registry:
    def __init__(self, kind: str, config_key: str = ""):
        self.kind = kind  # "advantage estimator", "rollout engine", ...
        self.config_key = config_key  # where a user names one, for error messages
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None):
        """`REG.register("x", fn)`, `REG.register("x", "pkg.mod:Class")`, or `@REG.register("x")`."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def deco(fn):
            self._items[name] = fn
            return fn

        return deco

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def _by_reference(self, name: str) -> bool:
        """`path.py:function` / `module:function`: the object itself, imported and registered under that name."""
        if ":" not in name or name in self._items:
            return name in self._items
        from r1cli.plugins import load_reference

        self._items[name] = load_reference(name)
        return True

    def check(self, name: str, where: str = "") -> None:
        if not self._by_reference(name):
            key = where or self.config_key
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise R1Error(f"unknown {self.kind} '{name}'" + (f" in {key}" if key else "") + hint
                          + f" (known: {', '.join(self.names())})")

    def get(self, name: str, where: str = "") -> Callable | Any:
        self.check(name, where)
        obj = self._items[name]
        if isinstance(obj, str):  # lazy "module:attribute"
            module, attr = obj.split(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items[name] = obj
        return obj
