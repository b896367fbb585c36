"""The reward registry and the scorer: a weighted sum of named rewards per sample.

A reward is `fn(completion, row, ctx) -> float`, or registered with batch=True `fn(completions, rows, ctx) ->
list[float]` (one call for a whole step's samples: a reward model, a remote verifier). A reward that raises, returns
something that is not a finite number, or runs past rewards.timeout_s counts as 0 for that sample (counted in
reward_failures/NAME and reported), never the end of the run; a batch call that raises is retried one sample at a
time, so one bad sample costs only itself (a batch past its limit - timeout_s per sample - is 0 for all of them).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from r1cli.config import DataConfig, RewardsConfig
from r1cli.registry import Registry


@dataclass(frozen=True)
class RewardContext:
    prefill: str = ""  # text the prompt already put at the start of the assistant turn
    language: str = "en"
    language_min_words: int = 8
    answer_field: str = "answer"
    task_field: str = "task"
    # the run's settings, for rewards that need more (a reward model, a judge: rewards.model / rewards.judge)
    data: DataConfig | None = field(default=None, compare=False)
    rewards: RewardsConfig | None = field(default=None, compare=False)

    def full(self, completion: str) -> str:
        """The assistant turn as written: the prefill the prompt ended with, then the completion."""
        if self.prefill and not completion.startswith(self.prefill):
            return self.prefill + completion
        return completion

    @classmethod
    def from_config(cls, data: DataConfig, rewards: RewardsConfig) -> "RewardContext":
        return cls(prefill=data.prefill, language=rewards.language, language_min_words=rewards.language_min_words,
                   answer_field=data.answer_field,
                   task_field=data.task_field, data=data, rewards=rewards)


RewardFn = Callable[[str, dict, RewardContext], float]
REWARDS = Registry("reward", "rewards.weights")


def reward(name: str, *, batch: bool = False):
    """Register a reward under `name` (the key of rewards.weights): the decorator the built-ins use, and a user's
    plugin file too. batch=True: the function takes lists (completions, rows) and returns a list of floats."""
    def deco(fn):
        fn.batch = batch
        REWARDS.register(name, fn)
        return fn

    return deco


@dataclass
class Scores:
    total: list[float]
    components: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


def score(completions: list[str], rows: list[dict], weights: dict[str, float], ctx: RewardContext,
          timeout_s: float = 0.0) -> Scores:
    """Weighted sum of the configured rewards for each (completion, row) pair."""
    comps: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    last_error: dict[str, str] = {}
    for name in weights:
        values, errors = _run(REWARDS.get(name), completions, rows, ctx, timeout_s)
        comps[name] = values
        if errors:
            failures[name] = len(errors)
            last_error[name] = errors[max(errors)]
    total = [sum(weights[n] * comps[n][i] for n in weights) for i in range(len(completions))]
    return Scores(total, comps, failures, last_error)


def _number(value) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"returned {v}, not a finite number")
    return v


def _run(fn, completions: list[str], rows: list[dict], ctx: RewardContext,
         timeout_s: float) -> tuple[list[float], dict[int, str]]:
    """(value per sample, {sample: error}); a failed sample's value is 0."""
    n = len(completions)
    if getattr(fn, "batch", False) and n:
        try:
            out = _within(lambda: list(fn(completions, rows, ctx)), timeout_s * n,
                          f"over rewards.timeout_s={timeout_s:g} s per sample, {n} samples")
            if len(out) != n:
                raise ValueError(f"returned {len(out)} values for {n} samples")
            return [_number(v) for v in out], {}
        except RewardTimeout as e:  # a hung batch is not one bad sample: retrying each would cost n limits
            return [0.0] * n, {i: f"timeout: {e}" for i in range(n)}
        except Exception:  # noqa: BLE001 - one sample at a time, to find the one that fails
            one = lambda c, r, ctx: fn([c], [r], ctx)[0]  # noqa: E731
            return _per_sample(one, completions, rows, ctx, timeout_s)
    return _per_sample(fn, completions, rows, ctx, timeout_s)


class RewardTimeout(Exception):
    pass


def _within(call, seconds: float, over: str):
    """call() in a daemon thread, waiting at most `seconds` (0: no limit); a call past it is left running and
    RewardTimeout(over) raised."""
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + seconds if seconds else None
    while worker.is_alive():
        worker.join(0.05)  # short waits: Ctrl-C reaches the main thread
        if deadline is not None and time.monotonic() > deadline:
            raise RewardTimeout(over)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _per_sample(fn, completions: list[str], rows: list[dict], ctx: RewardContext,
                timeout_s: float) -> tuple[list[float], dict[int, str]]:
    """fn on each sample in one worker thread; a sample past timeout_s is abandoned (0, an error) and a fresh
    worker goes on from the next one."""
    n = len(completions)
    values = [0.0] * n
    errors: dict[int, str] = {}
    start = 0
    while start < n:
        state = {"i": start, "since": time.monotonic(), "abandoned": False}

        def run(first=start, state=state):
            for j in range(first, n):
                state["i"], state["since"] = j, time.monotonic()
                try:
                    v = _number(fn(completions[j], rows[j], ctx))
                    if not state["abandoned"]:
                        values[j] = v
                except Exception as e:  # noqa: BLE001 - one sample's checker failing is that sample's 0
                    if not state["abandoned"]:
                        errors[j] = f"{type(e).__name__}: {e}"
                if state["abandoned"]:
                    return

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        start = n
        while worker.is_alive():
            worker.join(0.05)
            if timeout_s and worker.is_alive() and time.monotonic() - state["since"] > timeout_s:
                state["abandoned"] = True
                j = state["i"]
                values[j], errors[j] = 0.0, f"timeout: over rewards.timeout_s={timeout_s:g} s"
                start = j + 1
                break
    for j in errors:  # a late result of an abandoned sample does not count
        values[j] = 0.0
    return values, errors
