"""Multi-turn rollouts: a sample that ends a turn with a tool call gets the tool's output appended as an observation
and generation goes on, up to max_turns turns and max_tokens completion tokens in all.

How a call and its answer look is the call format's (r1cli.tools.formats: fenced blocks, or the chat template's
own tool calls). Samples at different turns go to the engine together, one call per turn (vLLM's prefix cache
keeps each sample's earlier turns); each turn's calls run in parallel. Observation tokens are context, not actions:
a Completion marks them (`observation`) so that training masks them out of the loss, the KL and the entropy, and
its log-probs are the model's tokens' only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from r1cli.interfaces import Completion, SamplingParams
from r1cli.tools import TOOLS, Observation, ToolLimits, call_tool, tool_name
from r1cli.tools.formats import Call, Fenced, call_format

TURN_SEED_STRIDE = 1_000_003  # turn t's continuations are seeded apart from every earlier turn's


@dataclass(frozen=True)
class TurnSettings:
    tools: tuple[str, ...]
    max_turns: int = 4  # model turns per sample (so at most max_turns - 1 turns with calls)
    max_tokens: int = 1024  # completion tokens per sample, model and observation tokens together
    limits: ToolLimits = ToolLimits()
    workers: int = 8  # samples' calls at once
    fmt: object = field(default_factory=Fenced)  # the call format (r1cli.tools.formats)


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
    pending: list[Call] = field(default_factory=list)  # the last turn's calls, not answered yet
    ended_eos: bool = False

    def add_turn(self, c: Completion, tok, fmt, room: int) -> None:
        ids = c.completion_ids[:room]
        self.ids += ids
        self.observation += [False] * len(ids)
        if self.logprobs is not None and c.logprobs is not None:
            self.logprobs += list(c.logprobs[: len(ids)])
        else:
            self.logprobs = None
        self.turns += 1
        self.finish = "length" if len(ids) < len(c.completion_ids) else c.finish_reason
        self.ended_eos = bool(ids) and ids[-1] == getattr(tok, "eos_token_id", None)
        # a turn that ended (its end-of-turn token, or a stop string; an engine may leave the token out of the ids)
        # is parsed; one cut by the token budget is not
        self.pending = fmt.parse(tok.decode(ids, skip_special_tokens=True)) if self.finish == "stop" else []

    def answer(self, settings: TurnSettings) -> list[tuple[Call, Observation]]:
        """Run the pending calls in order (a python call sees the sample's earlier successful calls)."""
        out = []
        for name, call in self.pending:
            obs = run_call(name, call, self.history.get(name, []), settings)
            self.calls += 1
            self.errors += obs.error
            if not obs.error:
                self.history.setdefault(name, []).append(call)
            out.append(((name, call), obs))
        return out

    def add_observation(self, text: str, tok, room: int) -> None:
        ids = tok(text, add_special_tokens=False)["input_ids"][:room]
        self.ids += ids
        self.observation += [True] * len(ids)


def run_call(name: str, call: str, history: list[str], settings: TurnSettings) -> Observation:
    refs = {tool_name(t): t for t in settings.tools}
    if name == "" and call:  # a call the format could not read: the reason
        return Observation(f"error: {call}", error=True)
    if name not in refs:
        return Observation(f"error: no tool '{name}' (tools: {', '.join(refs)})", error=True)
    return call_tool(refs[name], call, history, settings.limits)


def generate_with_tools(engine, tok, prompts: list[list[int]], params: SamplingParams,
                        settings: TurnSettings) -> list[list[Completion]]:
    """params.n multi-turn completions for each prompt, grouped per prompt as engine.generate returns them."""
    fmt = settings.fmt
    stops = tuple(dict.fromkeys((*params.stop, *fmt.stops)))
    samples = [_Sample(list(p)) for p in prompts for _ in range(params.n)]
    budget = min(params.max_tokens, settings.max_tokens)
    first = engine.generate(prompts, replace(params, stop=stops, max_tokens=budget))
    # continuations go one row per prompt: as many rows a call as the first turn's (the transformers engine)
    per_call = getattr(engine, "prompts_per_call", None)
    rows = per_call(prompts, params.n, budget) * params.n if per_call and prompts else 0
    for s, c in zip(samples, (c for group in first for c in group)):
        s.add_turn(c, tok, fmt, settings.max_tokens)
    turn = 1
    with ThreadPoolExecutor(max(1, settings.workers)) as pool:
        while True:
            # a call is answered only where the sample may go on: another turn and room after the observation
            live = [s for s in samples if s.pending and s.turns < settings.max_turns
                    and len(s.ids) < settings.max_tokens]
            answers = list(pool.map(lambda s: s.answer(settings), live))
            for s, a in zip(live, answers):
                s.add_observation(fmt.observation(a, s.ended_eos), tok, settings.max_tokens - len(s.ids))
            going = [s for s in live if len(s.ids) < settings.max_tokens]
            for s in live:
                if s not in going:
                    s.finish, s.pending = "length", []
            # ranks whose engines step together (vLLM data parallel) take as many turns as the busiest of them,
            # with no prompts once their own samples are done
            if not (engine.any_rank(bool(going)) if hasattr(engine, "any_rank") else going):
                break
            room = max((settings.max_tokens - len(s.ids) for s in going), default=1)
            outs = engine.generate([s.prompt + s.ids for s in going],
                                   replace(params, n=1, stop=stops, max_tokens=min(params.max_tokens, room),
                                           seed=params.seed + TURN_SEED_STRIDE * turn, rows_per_call=rows))
            for s, (c,) in zip(going, outs):
                s.add_turn(c, tok, fmt, settings.max_tokens - len(s.ids))
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


def with_tools(engine, tokenizer, rollout, data=None):
    """The engine itself, or a ToolEngine when rollout.tools names any (chat calls rendered with data's chat
    template settings)."""
    if not rollout.tools:
        return engine
    for name in rollout.tools:  # an unknown name is one line before anything generates
        TOOLS.check(name)
    settings = TurnSettings(tuple(rollout.tools), rollout.max_turns, rollout.max_total_tokens or rollout.max_new_tokens,
                            ToolLimits(rollout.tool_timeout_s, rollout.tool_output_chars,
                                       rollout.tool_state == "persist"), fmt=call_format(rollout, tokenizer, data))
    return ToolEngine(engine, tokenizer, settings)
