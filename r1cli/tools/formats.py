"""How a model writes a tool call and reads the answer (rollout.tool_format).

fenced (base models, the R1 template): a block fenced with the tool's name, then the marker CALL_END, at which the
engine stops; the observation is the output and the fence that closes it:

    ```python
    print(123456789 * 987654321)
    ```
    ```output
    121932631112635269
    ```

chat (instruct models): the model's own tool-call format, as its chat template describes the tools (`tools=` of
apply_chat_template) - JSON inside <tool_call></tool_call> (Qwen2.5, Qwen3, QwQ, Hermes), possibly several in one
turn, which ends with the end-of-turn token; the observation is exactly what the chat template renders after that
turn for the tool messages, up to the next assistant header.
"""

from __future__ import annotations

import json
import re

from r1cli.errors import R1Error
from r1cli.tools import Observation, tool_schemas

CALL_END = "```output"
_BLOCK = re.compile(r"```([\w.:/-]+)[ \t]*\n(.*?)\n?```\s*$", re.S)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_SENTINEL = "\x00R1-TURN\x00"

Call = tuple[str, str]  # (tool name as the model wrote it, what to run)


class Fenced:
    stops = (CALL_END,)

    def parse(self, text: str) -> list[Call]:
        """The call when a turn's text ends with a fenced block and CALL_END; [("", "")] for the marker alone (an
        error observation says so)."""
        body = text.rstrip()
        if not body.endswith(CALL_END):
            return []
        m = _BLOCK.search(body[: -len(CALL_END)])
        return [(m.group(1), m.group(2))] if m else [("", "")]

    def observation(self, answers: list[tuple[Call, Observation]], ended_turn: bool) -> str:
        return "".join("\n" + obs.text.rstrip("\n") + "\n```\n" for _, obs in answers)


class ChatCalls:
    """Hermes-style JSON tool calls, observations rendered by the chat template."""

    stops: tuple[str, ...] = ()

    def __init__(self, tokenizer, schemas: list[dict], template_kwargs: dict | None = None,
                 chat_template: str | None = None):
        self.tok, self.schemas = tokenizer, schemas
        self.kwargs = {**(template_kwargs or {}), "tools": schemas}
        self.template = chat_template
        self.args = {s["function"]["name"]: s["function"]["parameters"]["required"][0] for s in schemas}
        self.eos = getattr(tokenizer, "eos_token", None) or ""
        ask = [{"role": "user", "content": "?"}]
        try:
            probe = self._render([{"role": "tool", "name": "probe", "content": "R1-PROBE-OUTPUT"}])
            bare = tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True,
                                                 chat_template=self.template, **(template_kwargs or {}))
            described = self._apply(ask)
        except Exception as e:  # noqa: BLE001 - no template, or one that refuses tool messages
            raise R1Error(f"rollout.tool_format=chat: the chat template cannot show tools ({type(e).__name__}: {e});"
                          " use rollout.tool_format=fenced or a template with tool support (data.chat_template)"
                          ) from None
        if described == bare or "R1-PROBE-OUTPUT" not in probe:
            raise R1Error("rollout.tool_format=chat: the chat template " + ("ignores the tools" if described == bare
                          else "does not show tool messages") + "; use rollout.tool_format=fenced or a template "
                          "with tool support (data.chat_template)")

    def parse(self, text: str) -> list[Call]:
        """Every <tool_call> of a turn that ended (turns cut by the token budget are not parsed); a call that is not
        JSON naming a tool is ("", reason), answered with an error observation."""
        calls = []
        for raw in _TOOL_CALL.findall(text):
            try:
                obj = json.loads(raw)
                name, args = obj["name"], obj.get("arguments", {})
                args = json.loads(args) if isinstance(args, str) else args
            except (ValueError, KeyError, TypeError) as e:
                calls.append(("", f"the tool call is not JSON with a name and arguments ({e})"))
                continue
            want = self.args.get(name)
            value = args.get(want) if isinstance(args, dict) and want else None
            if value is None and isinstance(args, dict) and len(args) == 1:
                value = next(iter(args.values()))
            calls.append((str(name), str(value)) if value is not None else
                         ("", f"{name} takes one argument, '{want}'"))
        return calls

    def observation(self, answers: list[tuple[Call, Observation]], ended_turn: bool) -> str:
        """What the chat template puts after the assistant's turn: its end (less the end-of-turn token when the
        model's ids hold it: ended_turn), the tool messages, the next assistant header."""
        text = self._render([{"role": "tool", "name": name or "error", "content": obs.text}
                             for (name, _), obs in answers])
        return text[len(self.eos):] if ended_turn and self.eos and text.startswith(self.eos) else text

    def _render(self, tool_messages: list[dict]) -> str:
        msgs = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}, *tool_messages]
        return self._apply(msgs).split(_SENTINEL, 1)[1]

    def _apply(self, msgs: list[dict]) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                            chat_template=self.template, **self.kwargs)


def call_format(rollout, tokenizer, data=None):
    """The rollout's call format; chat renders with data.chat_template(_kwargs) when given."""
    if rollout.tool_format == "fenced":
        return Fenced()
    from r1cli.data.templates import template_source

    return ChatCalls(tokenizer, tool_schemas(rollout.tools), data.chat_template_kwargs if data else None,
                     template_source(data) if data else None)


__all__ = ["CALL_END", "ChatCalls", "Fenced", "call_format"]
