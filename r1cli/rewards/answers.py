"""Final answers and the task checkers that verify them, registered by task name (a row's task column).

A checker is `fn(completion, row, ctx) -> float` in [0, 1]; the `accuracy` reward dispatches
on the row's task to one of these.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from r1cli.registry import Registry

from .scoring import RewardContext

TASKS = Registry("task checker", "data.task_field")


def task(name: str):
    """Register a task checker under `name` (the value of a row's data.task_field): fn(completion, row, ctx) ->
    1.0 for a verified answer, else 0.0. The decorator the built-ins use, and a user's plugin file too."""
    return TASKS.register(name)

# ------------------------------------------------------------------ answers

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def all_boxed(text: str) -> list[str]:
    """The contents of every \\boxed{…} in text, braces balanced."""
    out, i = [], text.find("\\boxed{")
    while i >= 0:
        depth, start = 0, i + len("\\boxed{")
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                if depth == 0:
                    out.append(text[start:j])
                    break
                depth -= 1
        i = text.find("\\boxed{", i + 1)
    return out


def _outside_reasoning(text: str) -> str:
    """The text after the chain of thought: nothing while <think> is still open."""
    if "</think>" in text:
        return text[text.rfind("</think>") + len("</think>"):]
    return "" if "<think>" in text else text


def extract_answer(text: str) -> str | None:
    """The one final answer, or None.

    The single <answer>…</answer> block (a single \\boxed{} inside it wins), or else, without answer tags, the
    single \\boxed{} outside the reasoning. More than one final answer (two answer blocks, two boxes) is no
    answer, and nothing inside <think>…</think> is ever taken as one: either would let a policy hedge."""
    blocks = _ANSWER.findall(text)
    if len(blocks) > 1:
        return None
    if blocks:
        boxes = all_boxed(blocks[0])
        if len(boxes) > 1:
            return None
        return (boxes[0] if boxes else blocks[0]).strip()
    boxes = all_boxed(_outside_reasoning(text))
    return boxes[0].strip() if len(boxes) == 1 else None


# ------------------------------------------------------------------ checkers


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def _number(text: str) -> Fraction | None:
    """An exact number; commas only as thousands separators ("1,234" is 1234, "1,2" is no number)."""
    t = text.strip().rstrip(".")
    if "," in t:
        if not _THOUSANDS.fullmatch(t):
            return None
        t = t.replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


@task("arithmetic")
def arithmetic_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    ans = extract_answer(ctx.full(completion))
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


@task("countdown")
def countdown_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """1 if the answer is an expression using each given number exactly once that equals the target."""
    ans = extract_answer(ctx.full(completion))
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
        s = s.replace("\\$", "").strip()  # a currency sign is not a math delimiter: \$1000 is 1000
        return s if "$" in s or "\\(" in s else f"${s}$"

    # math-verify bounds itself with SIGALRM, which works in the main thread only; the scorer runs rewards in a
    # worker thread, where rewards.timeout_s bounds the whole call instead
    import logging
    import threading

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    if limit is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning, every call
    gold_parsed = parse(wrap(gold), parsing_timeout=limit)
    ans_parsed = parse(wrap(answer), parsing_timeout=limit)
    if not gold_parsed or not ans_parsed:
        return answer.strip() == gold.strip()
    return bool(verify(gold_parsed, ans_parsed, timeout_seconds=limit))


@task("math")
def math_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    ans = extract_answer(ctx.full(completion))
    return 0.0 if ans is None else float(math_equal(ans, str(row[ctx.answer_field])))


_CODE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def code_of(completion: str) -> str:
    """The program in a completion: its last ```python block, or the whole text when it has none."""
    blocks = _CODE.findall(completion)
    return blocks[-1] if blocks else completion


@task("code")
def code_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    """1 if the program passes every stdin/stdout test of the row (its answer field, or "tests"), run in the
    sandbox (r1cli.sandbox); a crash, a timeout or a wrong line is that sample's 0."""
    import json

    from r1cli.sandbox import Limits, run_program

    tests = row.get("tests", row.get(ctx.answer_field))
    if isinstance(tests, str):
        tests = json.loads(tests)
    program = code_of(ctx.full(completion).split("</think>")[-1])
    for t in tests:
        r = run_program(program, str(t["input"]), Limits(wall_s=10, cpu_s=5))
        if not r.ok or r.stdout.split() != str(t["output"]).split():
            return 0.0
    return 1.0
