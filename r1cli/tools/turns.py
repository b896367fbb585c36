"""Multi-turn rollouts: a sample that ends a turn with a tool call gets the tool's output appended as an observation
and generation goes on, up to max_turns turns and max_tokens completion tokens in all.

The fenced format (base models, the R1 template): the model writes a block fenced with the tool's name and then the
marker CALL_END, at which the engine stops:

    ```python
    print(123456789 * 987654321)
    ```
    ```output

and the observation closes the output block: "\\n121932631112635269\\n```\\n". Samples at different turns go to the
engine together, one call per turn; each turn's calls run in parallel. Observation tokens are context, not actions:
a Completion marks them (`observation`) so that training masks them out of the loss, the KL and the entropy, and
its log-probs are the model's tokens' only.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from r1cli.interfaces import Completion, SamplingParams
from r1cli.tools import TOOLS, Observation, ToolLimits, call_tool

CALL_END = "```output"
_BLOCK = re.compile(r"```([\w.:/-]+)[ \t]*\n(.*?)\n?```\s*$", re.S)
TURN_SEED_STRIDE = 1_000_003  # turn t's continuations are seeded apart from every earlier turn's


@dataclass(frozen=True)
class TurnSettings:
    tools: tuple[str, ...]
    max_turns: int = 4  # model turns per sample (so at most max_turns - 1 tool calls)
    max_tokens: int = 1024  # completion tokens per sample, model and observation tokens together
    limits: ToolLimits = ToolLimits()
    workers: int = 8  # tool calls at once


def parse_call(text: str) -> tuple[str, str] | None:
    """(tool, call) when a turn's text ends with a fenced block and CALL_END, else None."""
    body = text.rstrip()
    if not body.endswith(CALL_END):
        return None
    m = _BLOCK.search(body[: -len(CALL_END)])
    if m is None:
        return ("", "")  # the marker without a block: an error observation says so
    return m.group(1), m.group(2)


@dataclass
class _Sample:
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    observation: list[bool] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    history: dict[str, list[str]] = field(default_factory=dict)
    turns: int = 0
    calls: int = 0
    errors: int = 0
    finish: str = "stop"
    call: tuple[str, str] | None = None

    def add_turn(self, c: Completion, tok, room: int) -> None:
        ids = c.completion_ids[:room]
        self.ids += ids
        self.observation += [False] * len(ids)
        if self.logprobs is not None and c.logprobs is not None:
            self.logprobs += list(c.logprobs[: len(ids)])
        else:
            self.logprobs = None
        self.turns += 1
        self.finish = "length" if len(ids) < len(c.completion_ids) else c.finish_reason
        self.call = parse_call(tok.decode(ids, skip_special_tokens=True)) if self.finish == "stop" else None

    def add_observation(self, name: str, call: str, obs: Observation, tok, room: int) -> None:
        self.calls += 1
        self.errors += obs.error
        if not obs.error:
            self.history.setdefault(name, []).append(call)
        ids = tok("\n" + obs.text.rstrip("\n") + "\n```\n", add_special_tokens=False)["input_ids"][:room]
        self.ids += ids
        self.observation += [True] * len(ids)


def fence_name(tool: str) -> str:
    """What the model writes after ``` to call a tool: its registered name, or a `path.py:function`'s function."""
    return tool.rsplit(":", 1)[-1]


def run_call(name: str, call: str, history: list[str], settings: TurnSettings) -> Observation:
    refs = {fence_name(t): t for t in settings.tools}
    if name not in refs:
        return Observation(f"error: no tool '{name}' (tools: {', '.join(refs)})", error=True)
    return call_tool(refs[name], call, history, settings.limits)


def generate_with_tools(engine, tok, prompts: list[list[int]], params: SamplingParams,
                        settings: TurnSettings) -> list[list[Completion]]:
    """params.n multi-turn completions for each prompt, grouped per prompt as engine.generate returns them."""
    stops = tuple(dict.fromkeys((*params.stop, CALL_END)))
    samples = [_Sample(list(p)) for p in prompts for _ in range(params.n)]
    budget = min(params.max_tokens, settings.max_tokens)
    first = engine.generate(prompts, replace(params, stop=stops, max_tokens=budget))
    for s, c in zip(samples, (c for group in first for c in group)):
        s.add_turn(c, tok, settings.max_tokens)
    turn = 1
    with ThreadPoolExecutor(max(1, settings.workers)) as pool:
        while True:
            # a call is answered only where the sample may go on: another turn and room after the observation
            live = [s for s in samples if s.call is not None and s.turns < settings.max_turns
                    and len(s.ids) < settings.max_tokens]
            if not live:
                break
            obs = list(pool.map(lambda s: run_call(s.call[0], s.call[1], s.history.get(s.call[0], []), settings),
                                live))
            for s, o in zip(live, obs):
                s.add_observation(s.call[0], s.call[1], o, tok, settings.max_tokens - len(s.ids))
            going = [s for s in live if len(s.ids) < settings.max_tokens]
            for s in live:
                if s not in going:
                    s.finish, s.call = "length", None
            if not going:
                break
            room = max(settings.max_tokens - len(s.ids) for s in going)
            outs = engine.generate([s.prompt + s.ids for s in going],
                                   replace(params, n=1, stop=stops, max_tokens=min(params.max_tokens, room),
                                           seed=params.seed + TURN_SEED_STRIDE * turn))
            for s, (c,) in zip(going, outs):
                s.add_turn(c, tok, settings.max_tokens - len(s.ids))
            turn += 1
    out = []
    for i in range(len(prompts)):
        group = []
        for s in samples[i * params.n: (i + 1) * params.n]:
            group.append(Completion(s.prompt, s.ids, tok.decode(s.ids, skip_special_tokens=True), s.finish,
                                    s.logprobs, observation=s.observation, turns=s.turns, tool_calls=s.calls,
                                    tool_errors=s.errors))
        out.append(group)
    return out


class ToolEngine:
    """An engine whose generate runs multi-turn rollouts with the configured tools; everything else is the engine's
    own (weights, sleep, wake)."""

    def __init__(self, engine, tokenizer, settings: TurnSettings):
        self.engine, self.tok, self.settings = engine, tokenizer, settings

    def __getattr__(self, attr):
        return getattr(self.engine, attr)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return generate_with_tools(self.engine, self.tok, prompts, params, self.settings)


def with_tools(engine, tokenizer, rollout):
    """The engine itself, or a ToolEngine when rollout.tools names any."""
    if not rollout.tools:
        return engine
    for name in rollout.tools:  # an unknown name is one line before anything generates
        TOOLS.check(name)
    settings = TurnSettings(tuple(rollout.tools), rollout.max_turns, rollout.max_total_tokens or rollout.max_new_tokens,
                            ToolLimits(rollout.tool_timeout_s, rollout.tool_output_chars,
                                       rollout.tool_state == "persist"))
    return ToolEngine(engine, tokenizer, settings)
