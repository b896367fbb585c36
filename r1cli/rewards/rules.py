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


@reward("language")
def language_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Share of the chain of thought's words in the target language (R1 paper, section 2.3.3).

    Words are Latin-script words for 'en' and single CJK characters for 'zh'.
    """
    text = ctx.full(completion)
    m = _THINK.search(text)
    if m is None:
        return 0.0
    cot = m.group(1)
    latin, cjk = len(_LATIN.findall(cot)), len(_CJK.findall(cot))
    total = latin + cjk
    if total == 0:
        return 1.0
    if ctx.language == "en":
        return latin / total
    if ctx.language == "zh":
        return cjk / total
    raise ValueError(f"language reward knows en and zh, not '{ctx.language}'")
