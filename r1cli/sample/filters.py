"""Why a chain of thought that reached the right answer may still not be worth training on (DeepSeek-R1:
"we filter out chain-of-thought with mixed languages, long paragraphs, and code blocks"; the cold-start data
also drops samples without a final answer and over-long ones), as small pure checks."""

from __future__ import annotations

import re
from collections import Counter

from r1cli.config import FilterConfig
from r1cli.parsing import final_answer_of, reasoning_of
from r1cli.rewards import REWARDS, RewardContext
from r1cli.rewards.rules import language_share


def rejection(text: str, row: dict, ctx: RewardContext, cfg: FilterConfig, n_tokens: int = 0) -> str | None:
    """The first reason to drop a sample, or None to keep it; `text` includes any prefill."""
    if not final_answer_of(text):
        return "no final answer"
    if cfg.max_response_tokens and n_tokens > cfg.max_response_tokens:
        return "over-long"
    if cfg.require_format and REWARDS.get("format")(text, row, ctx) < 1.0:
        return "bad format"
    cot = reasoning_of(text)
    if cfg.mixed_language and language_share(cot, ctx.language)[0] < cfg.min_language_share:
        return "mixed language"
    if cfg.code_blocks and "```" in cot:
        return "code block"
    if cfg.max_paragraph_chars and max((len(p) for p in re.split(r"\n\s*\n", cot)), default=0) > \
            cfg.max_paragraph_chars:
        return "long paragraph"
    return None


def dedupe_key(text: str) -> str:
    return " ".join(text.split())


def pick(texts: list[str], reasons: list[str | None], cap: int) -> tuple[list[int], Counter]:
    """The candidates to keep (indices, in order) and why the others went: each one's own reason, else a
    duplicate of a kept one, else past the cap. Kept + counted add up to len(texts)."""
    why_not, seen, kept = Counter(), set(), []
    for j, (text, why) in enumerate(zip(texts, reasons)):
        if why is None and dedupe_key(text) in seen:
            why = "duplicate"
        if why is None and len(kept) >= cap:
            why = "over keep_per_prompt"
        if why is not None:
            why_not[why] += 1
            continue
        seen.add(dedupe_key(text))
        kept.append(j)
    return kept, why_not
