"""Tools a model calls inside its reasoning (rollout.tools): name -> tool, and what a call returns.

A tool takes the call (the code or expression the model wrote) and the sample's earlier calls, and returns an
Observation; whatever goes wrong inside it - an exception, a timeout, a hostile program - is an error observation
for that sample, never the run's end. `path.py:function` in rollout.tools names a tool of your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.registry import Registry

TOOLS = Registry("tool", "rollout.tools")
TOOLS.register("python", "r1cli.tools.python_tool:python")
TOOLS.register("calculator", "r1cli.tools.calculator:calculator")


@dataclass(frozen=True)
class Observation:
    text: str  # what the model reads next (already cut to the output limit)
    error: bool = False  # the call failed: an exception, a timeout, a limit


@dataclass(frozen=True)
class ToolLimits:
    timeout_s: float = 10.0
    output_chars: int = 1000  # longer output is cut, with a note
    persist: bool = True  # python: a sample's earlier calls run again (silently) before the new one


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters cut)"


def call_tool(name: str, call: str, history: list[str], limits: ToolLimits) -> Observation:
    """One call, whatever happens in it: an exception of the tool's is that call's error observation."""
    try:
        out = TOOLS.get(name)(call, history, limits)
    except Exception as e:  # noqa: BLE001 - a tool's failure is the sample's, not the run's
        return Observation(clip(f"{type(e).__name__}: {e}", limits.output_chars), error=True)
    if not isinstance(out, Observation):
        out = Observation(str(out))
    return Observation(clip(out.text, limits.output_chars), out.error)
