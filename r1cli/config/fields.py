"""Field helpers: a setting's valid range, registry or owner, declared beside it."""

from __future__ import annotations

from dataclasses import field


def named(default: str, registry: str):
    """A field whose valid values are the names in a registry ("module:ATTR"): one definition of the names."""
    return field(default=default, metadata={"registry": registry})


def bounded(default, low=None, high=None, *, above: bool = False):
    """A number with its valid range beside it: >= low (> low with above=True) and <= high."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


def owned(factory, key: str, values: tuple[str, ...]):
    """A sub-section read only when config key `key` is one of `values`; set otherwise, it is refused."""
    return field(default_factory=factory, metadata={"owner": (key, values)})
