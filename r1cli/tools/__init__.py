"""Tools a model calls inside its reasoning (rollout.tools): name -> tool, and what a call returns.

A tool takes the call (the code or expression the model wrote) and the sample's earlier calls, and returns an
Observation; whatever goes wrong inside it - an exception, a timeout, a hostile program - is an error observation
for that sample, never the run's end. `path.py:function` in rollout.tools names a tool of your own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


# what the chat format tells the model about a tool (its schema's one string argument, and a description)
ARGUMENTS = {
    "python": ("code", "Runs Python 3 code in a sandbox and returns what it prints (or the error). State carries "
                       "over between a conversation's calls."),
    "calculator": ("expression", "Evaluates an arithmetic expression exactly: + - * / // % ** and parentheses."),
}


def tool_name(ref: str) -> str:
    """What the model calls a tool: its registered name, or a `path.py:function`'s function."""
    return ref.rsplit(":", 1)[-1]


def tool_schemas(refs) -> list[dict]:
    """OpenAI-style function schemas, as chat templates take them (`tools=`): one string argument each - `code`,
    `expression`, or `input` for a tool of your own, described by its docstring's first line."""
    out = []
    for ref in refs:
        arg, doc = ARGUMENTS.get(ref) or ("input", ((TOOLS.get(ref).__doc__ or "").strip().splitlines() or
                                                    [f"The tool {tool_name(ref)}."])[0])
        out.append({"type": "function", "function": {
            "name": tool_name(ref), "description": doc,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}}})
    return out


def with_tool_schemas(data, rollout):
    """data with the tools handed to the chat template (rollout.tool_format=chat), so that the prompts describe
    them; else data itself."""
    if not rollout.tools or rollout.tool_format != "chat":
        return data
    return replace(data, chat_template_kwargs={**data.chat_template_kwargs, "tools": tool_schemas(rollout.tools)})
