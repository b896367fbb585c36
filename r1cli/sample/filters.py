"""Why a verified-correct sample may still not be worth training on (DeepSeek-R1, stage 3: "we filter
out chain-of-thought with mixed languages, long paragraphs, and code blocks"), as small pure checks."""

from __future__ import annotations

import re

from r1cli.config import SampleConfig
from r1cli.rewards import REWARDS, RewardContext

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def reasoning_of(text: str) -> str:
    """The chain of thought: inside <think>…</think>, else everything before <answer>."""
    m = _THINK.search(text)
    return m.group(1) if m else text.split("<answer>")[0]


def rejection(text: str, row: dict, ctx: RewardContext, cfg: SampleConfig) -> str | None:
    """The first reason to drop a (correct) sample, or None to keep it; `text` includes any prefill."""
    if cfg.require_format and REWARDS.get("format")(text, row, ctx) < 1.0:
        return "bad format"
    cot = reasoning_of(text)
    share = REWARDS.get("language")(f"<think>{cot}</think>", row, RewardContext(language=ctx.language))
    if cfg.filter_mixed_language and share < cfg.min_language_share:
        return "mixed language"
    if cfg.filter_code_blocks and "```" in cot:
        return "code block"
    if cfg.max_paragraph_chars and max((len(p) for p in re.split(r"\n\s*\n", cot)), default=0) > \
            cfg.max_paragraph_chars:
        return "long paragraph"
    return None


def dedupe_key(text: str) -> str:
    return " ".join(text.split())
