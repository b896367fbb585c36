"""Final answers and the task checkers that verify them, registered by task name (a row's task column).

A checker is `fn(completion, row, ctx) -> float` in [0, 1]; the `accuracy` reward dispatches
on the row's task to one of these.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction

from r1cli.errors import R1Error
from r1cli.parsing import all_boxed
from r1cli.registry import Registry

from .scoring import RewardContext

TASKS = Registry("task checker", "data.task_field")


def task(name: str):
    """Register a task checker under `name` (the value of a row's data.task_field): fn(completion, row, ctx) ->
    1.0 for a verified answer, else 0.0. The decorator the built-ins use, and a user's plugin file too. A checker
    may carry `fn.row_problem(row, answer_field) -> str | None`, what makes a row unusable for it."""
    return TASKS.register(name)


def check_task_rows(rows, task_field: str, answer_field: str, only=None) -> None:
    """Before any model loads: every row (or those numbered in `only`) names a task with a checker, and holds what
    that checker reads -- an unknown task or a malformed row would otherwise score every sample as a wrong answer,
    silently."""
    for i, row in enumerate(rows):
        if only is not None and i not in only:
            continue
        name = row.get(task_field) or "math"
        if name not in TASKS:
            raise R1Error(f"{rows.where(i)}: task {name!r} has no checker (known: {', '.join(TASKS.names())}; a "
                          "plugin file registers more with @task)")
        problem = getattr(TASKS.get(name), "row_problem", None)
        if problem is not None and (why := problem(row, answer_field)):
            raise R1Error(f"{rows.where(i)}: not a {name} row: {why}")


def _scalar_answer(row: dict, answer_field: str) -> str | None:
    value = row.get(answer_field)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"{answer_field} must be text or a number, got {json.dumps(value)[:80]}"
    return None


def _countdown_row(row: dict, answer_field: str) -> str | None:
    numbers = row.get("numbers")
    if not isinstance(numbers, list) or not numbers or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in numbers):
        return f"numbers must be a list of integers, got {json.dumps(numbers)[:80]}"
    if not re.fullmatch(r"-?\d+", str(row.get(answer_field, "")).strip()):
        return f"{answer_field} (the target) must be an integer, got {json.dumps(row.get(answer_field))[:80]}"
    return None


def _code_row(row: dict, answer_field: str) -> str | None:
    if "entry_point" in row or "test" in row:  # function-call tests (HumanEval's form)
        if not (isinstance(row.get("entry_point"), str) and isinstance(row.get("test"), str)):
            return "function-call tests need entry_point (the function's name) and test (code defining check)"
        return None
    tests = row.get("tests", row.get(answer_field))
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            return "tests is a string but not JSON"
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) and {"input", "output"} <= t.keys()
                                                           for t in tests):
        return "tests must be a non-empty list of {input, output}"
    return None

# ------------------------------------------------------------------ answers

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _outside_reasoning(text: str) -> str:
    """The text after the chain of thought: nothing while <think> is still open."""
    if "</think>" in text:
        return text[text.rfind("</think>") + len("</think>"):]
    return "" if "<think>" in text else text


def _without_boxes(text: str) -> str:
    for box in all_boxed(text):
        text = text.replace("\\boxed{" + box + "}", " ", 1)
    return text


def _agrees(text: str, answer: str, numbers: bool = True) -> bool:
    """No other answer stated in `text`: no box, and (`numbers`, for a numeric answer) no number but its value."""
    if all_boxed(text):
        return False
    value = number(answer)
    if not numbers or value is None:
        return True
    return all(number(x.rstrip(",")) == value for x in _NUMBERS.findall(text))


def extract_answer(text: str) -> str | None:
    """The one final answer, or None.

    Only the text after the chain of thought counts (nothing inside <think>…</think>, nothing while it is still
    open). There: the single <answer>…</answer> block (a single \\boxed{} inside it wins), or else, without answer
    tags, the single \\boxed{}. Anything else that states another answer makes it no answer: a second block or
    box, a box outside the block, text beside the block's box or after the block that names another number.
    Each would let a policy hedge - so would a second <answer> block anywhere, after a second <think> included."""
    if len(_ANSWER.findall(text)) > 1:
        return None
    text = _outside_reasoning(text)
    blocks = list(_ANSWER.finditer(text))
    if len(blocks) > 1:
        return None
    if blocks:
        block = blocks[0].group(1)
        boxes = all_boxed(block)
        if len(boxes) > 1:
            return None
        answer = (boxes[0] if boxes else block).strip()
        if boxes and not _agrees(_without_boxes(block), answer):
            return None
        before, after = text[: blocks[0].start()], text[blocks[0].end():]
        return answer if _agrees(before, answer, numbers=False) and _agrees(after, answer) else None
    boxes = all_boxed(text)
    if len(boxes) != 1:
        return None
    answer = boxes[0].strip()
    after = text[text.find("\\boxed{") + len("\\boxed{") + len(boxes[0]) + 1:]
    return answer if _agrees(after, answer) else None


# ------------------------------------------------------------------ numbers

# One rule for a numeric answer in every checker: a number written out -- an optional sign, digits with
# thousands commas or none, a decimal part, or a fraction a/b or \frac{a}{b}, with an optional unit in \text{}
# -- equal by value. An expression still to be computed (40+2), Python's digit grouping (4_2) or a percent sign
# the gold answer lacks (42\% is 0.42) is not that number.
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")
_PLAIN = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac(?:\{\s*(\d+)\s*\}|(\d))(?:\{\s*(\d+)\s*\}|(\d))")  # \frac12 too
_SLASH = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_NUMBERS = re.compile(r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?")
_NAMED = re.compile(r"^[A-Za-z]\s*=\s*")
_UNIT = re.compile(r"\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}\s*$")  # a unit names the quantity
_PERCENT = re.compile(r"\s*\\?%\s*$")


def number(text: str) -> Fraction | None:
    """The exact value of a number written out (the rule above), or None."""
    t = text.replace("\\$", "").strip().strip("$").strip().rstrip(".").replace("\\,", "").replace("\\!", "")
    t = _UNIT.sub("", _NAMED.sub("", t, count=1))  # x = 42, 5 \text{ cm}
    try:
        if _THOUSANDS.fullmatch(t):
            return Fraction(t.replace(",", ""))
        if _PLAIN.fullmatch(t):
            return Fraction(t)
        if m := _FRAC.fullmatch(t):
            return Fraction(int(m[2] or m[3]), int(m[4] or m[5])) * (-1 if m[1] == "-" else 1)
        if m := _SLASH.fullmatch(t):
            return Fraction(int(m[1]), int(m[2]))
    except ZeroDivisionError:
        return None
    return None


@task("arithmetic")
def arithmetic_reward(completion: str, row: dict, ctx: RewardContext) -> float:
    ans = extract_answer(ctx.full(completion))
    if ans is None:
        return 0.0
    got, want = number(ans), number(str(row[ctx.answer_field]))
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
    """A numeric gold answer: the number rule above (the arithmetic checker's). Otherwise symbolic equality through
    math-verify (LaTeX or plain expressions)."""
    a, g = _PERCENT.search(answer.strip().strip("$")), _PERCENT.search(gold.strip().strip("$"))
    if a and g:  # both in percent: the numbers
        answer, gold = answer.strip().strip("$")[: a.start()], gold.strip().strip("$")[: g.start()]
    if (want := number(gold)) is not None:
        return number(answer) == want
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
    """1 if the program passes every test of the row, run in the sandbox (r1cli.sandbox); a crash, a timeout or a
    wrong line is that sample's 0. Tests: stdin/stdout pairs (the answer field, or "tests"), each output compared
    here; or function-call tests (entry_point, test defining check(candidate), optional setup: trusted helpers),
    which run here against the program's answers (r1cli.sandbox.harness): the program's exit decides nothing."""
    from r1cli.sandbox import Limits
    from r1cli.sandbox.launcher import launch, launch_many

    program = code_of(ctx.full(completion).split("</think>")[-1])
    if "entry_point" in row:
        from r1cli.sandbox.harness import CallTest, judge_many

        setup = row.get("setup", "")
        test = CallTest(setup, setup + "\n" + program, row["entry_point"], row["test"])
        [(passed, _)] = judge_many([test], lambda jobs: launch_many(jobs, Limits(wall_s=10, cpu_s=5)))
        return float(passed)
    tests = row.get("tests", row.get(ctx.answer_field))
    if isinstance(tests, str):
        tests = json.loads(tests)
    for t in tests:
        r = launch(program, str(t["input"]), Limits(wall_s=10, cpu_s=5))
        if not r.ok or r.stdout.split() != str(t["output"]).split():
            return 0.0
    return 1.0


arithmetic_reward.row_problem = _scalar_answer
math_reward.row_problem = _scalar_answer
countdown_reward.row_problem = _countdown_row
code_reward.row_problem = _code_row
