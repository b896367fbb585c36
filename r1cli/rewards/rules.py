"""Rule-based rewards (no neural reward model): accuracy, strict and partial format, language consistency."""

from __future__ import annotations

import re

from .answers import TASKS
from .scoring import RewardContext, reward

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@reward("accuracy")
def accuracy_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """The checker named by the row's task column (math when absent)."""
    task = row.get(ctx.task_field) or "math"
    if task not in TASKS:
        raise ValueError(f"no checker for task '{task}' (known: {', '.join(TASKS.names())})")
    return TASKS.get(task)(completion, row, ctx)


accuracy_reward.needs_answer = True  # rows without data.answer_field are an error, not silent zeros


_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # text holding none of the four tags
_STRICT = re.compile(rf"^\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*$", re.DOTALL)


@reward("format")
def format_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Strict: exactly one <think>…</think> followed by exactly one <answer>…</answer>, nothing else."""
    text = ctx.full(completion)
    return float(bool(_STRICT.match(text)))


@reward("format_partial")
def partial_format_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Shaped credit: 0.25 for each of the four tags appearing exactly once, in order."""
    text = ctx.full(completion)
    score, pos = 0.0, 0
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) == 1 and text.find(tag) >= pos:
            score += 0.25
            pos = text.find(tag)
    return score


_LATIN = re.compile(r"[A-Za-z]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def language_share(cot: str, language: str) -> tuple[float, int]:
    """The share of a chain of thought's words in `language` and how many words it has (Latin-script words for
    'en', single CJK characters for 'zh'); a text with no words has share 1.0."""
    latin, cjk = len(_LATIN.findall(cot)), len(_CJK.findall(cot))
    total = latin + cjk
    if language not in ("en", "zh"):
        raise ValueError(f"language reward knows en and zh, not '{language}'")
    if total == 0:
        return 1.0, 0
    return (latin if language == "en" else cjk) / total, total


@reward("language")
def language_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Share of the chain of thought's words in the target language (R1 paper, section 2.3.3); a chain of thought
    with fewer than rewards.language_min_words words (empty, digits only) earns nothing."""
    m = _THINK.search(ctx.full(completion))
    if m is None:
        return 0.0
    share, words = language_share(m.group(1), ctx.language)
    return share if words >= max(1, ctx.language_min_words) else 0.0
