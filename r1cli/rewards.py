"""Rule-based rewards (no neural reward model), each a small function in a registry.

A reward is `fn(completion, row, ctx) -> float`; `score` applies the configured
weights, and a reward that raises counts as 0 for that sample (counted and
reported), never the end of the run.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from r1cli.errors import R1Error


@dataclass
class RewardContext:
    prefill: str = ""  # text the prompt already put at the start of the assistant turn
    language: str = "en"
    answer_field: str = "answer"
    task_field: str = "task"


RewardFn = Callable[[str, dict, RewardContext], float]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------ answers

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[start:j]
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    """The last <answer>…</answer>, or else the last \\boxed{…}; a boxed answer inside <answer> wins."""
    found = _ANSWER.findall(text)
    if found:
        inner = found[-1].strip()
        return _last_boxed(inner) or inner
    boxed = _last_boxed(text)
    return boxed.strip() if boxed is not None else None


def _full(completion: str, ctx: RewardContext) -> str:
    return ctx.prefill + completion if ctx.prefill and not completion.startswith(ctx.prefill) else completion


# ------------------------------------------------------------------ checkers


def _number(text: str) -> Fraction | None:
    t = text.strip().replace(",", "").rstrip(".")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


@register("arithmetic")
def arithmetic_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    got, want = _number(ans), _number(str(row[ctx.answer_field]))
    return float(got is not None and got == want)


def _eval_expr(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_expr(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_expr(node.left), _eval_expr(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b  # ZeroDivisionError is the sample's 0
    raise ValueError("only integers, + - * / and parentheses are allowed")


@register("countdown")
def countdown_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """1 if the answer is an expression using each given number exactly once that equals the target."""
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    expr = ans.split("=")[0].strip()
    if not re.fullmatch(r"[\d+\-*/() .]+", expr):
        return 0.0
    used = Counter(int(x) for x in re.findall(r"\d+", expr))
    if used != Counter(int(x) for x in row["numbers"]):
        return 0.0
    try:
        value = _eval_expr(ast.parse(expr, mode="eval"))
    except (SyntaxError, ZeroDivisionError, ValueError):
        return 0.0
    return float(value == Fraction(int(row[ctx.answer_field])))


def math_equal(answer: str, gold: str) -> bool:
    """Symbolic equality through math-verify (LaTeX or plain expressions)."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if "$" in s or "\\(" in s else f"${s}$"

    gold_parsed = parse(wrap(gold))
    ans_parsed = parse(wrap(answer))
    if not gold_parsed or not ans_parsed:
        return answer.strip() == gold.strip()
    return bool(verify(gold_parsed, ans_parsed))


@register("math")
def math_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    ans = extract_answer(completion)
    return 0.0 if ans is None else float(math_equal(ans, str(row[ctx.answer_field])))


@register("accuracy")
def accuracy_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """The checker named by the row's task column (math when absent)."""
    task = row.get(ctx.task_field) or "math"
    if task not in ("arithmetic", "countdown", "math"):
        raise ValueError(f"no checker for task '{task}'")
    return REWARDS[task](completion, row, ctx)


_STRICT = re.compile(r"^\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*$",
                     re.DOTALL)


@register("format")
def format_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Strict: exactly one <think>…</think> followed by exactly one <answer>…</answer>, nothing else."""
    text = _full(completion, ctx)
    return float(bool(_STRICT.match(text)))


@register("format_partial")
def partial_format_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Shaped credit: 0.25 for each of the four tags appearing exactly once, in order."""
    text = _full(completion, ctx)
    score, pos = 0.0, 0
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) == 1 and text.find(tag) >= pos:
            score += 0.25
            pos = text.find(tag)
    return score


_LATIN = re.compile(r"[A-Za-z]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@register("language")
def language_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """Share of the chain of thought's words in the target language (R1 paper, section 2.3.3).

    Words are Latin-script words for 'en' and single CJK characters for 'zh'.
    """
    text = _full(completion, ctx)
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


# ------------------------------------------------------------------ scoring


@dataclass
class Scores:
    total: list[float]
    components: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


def check_weights(weights: dict[str, float]) -> None:
    for name in weights:
        if name not in REWARDS:
            import difflib

            close = difflib.get_close_matches(name, list(REWARDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise R1Error(f"unknown reward '{name}' in rewards.weights{hint} (known: {', '.join(sorted(REWARDS))})")


def score(completions: list[str], rows: list[dict], weights: dict[str, float], ctx: RewardContext) -> Scores:
    """Weighted sum of the configured rewards for each (completion, row) pair."""
    comps: dict[str, list[float]] = {name: [] for name in weights}
    failures: dict[str, int] = {}
    last_error: dict[str, str] = {}
    for text, row in zip(completions, rows):
        for name in weights:
            try:
                v = float(REWARDS[name](text, row, ctx))
            except Exception as e:  # noqa: BLE001 - one sample's checker failing is that sample's 0
                failures[name] = failures.get(name, 0) + 1
                last_error[name] = f"{type(e).__name__}: {e}"
                v = 0.0
            comps[name].append(v)
    total = [sum(weights[n] * comps[n][i] for n in weights) for i in range(len(completions))]
    return Scores(total, comps, failures, last_error)
