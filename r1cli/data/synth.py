"""Synthetic tasks with exact, checkable answers: multi-digit arithmetic and Countdown.

Each row has `prompt`, `answer`, `task` (which checker verifies it) and a worked
`response` in `<think>…</think><answer>…</answer>` form for cold-start SFT.
"""

from __future__ import annotations

import random

OPS = "+-*"


def _add_steps(a: int, b: int) -> str:
    """Column addition, least significant digit first: what a person writes down."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ", ".join(steps)


def arithmetic_row(rng: random.Random, digits: int, ops: str) -> dict:
    op = rng.choice(ops)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op == "+":
        think = _add_steps(a, b)
    elif op == "-":
        think = f"{a}-{b}: {a}-{b - b % 10}={a - (b - b % 10)}, then -{b % 10}"
    else:
        think = f"{a}*{b}: {a}*{b // 10 * 10}={a * (b // 10 * 10)}, {a}*{b % 10}={a * (b % 10)}"
    return {
        "prompt": f"{a}{op}{b}=?",
        "answer": str(value),
        "task": "arithmetic",
        "response": f"<think>{think}</think><answer>{value}</answer>",
    }


def _countdown_expr(rng: random.Random, numbers: list[int]) -> tuple[str, int, list[str]]:
    """Combine the numbers left to right with random ops, keeping every value a positive integer."""
    nums = numbers[:]
    rng.shuffle(nums)
    expr, value, steps = str(nums[0]), nums[0], []
    for n in nums[1:]:
        choices = ["+", "*"] + (["-"] if value > n else []) + (["/"] if n and value % n == 0 else [])
        op = rng.choice(choices)
        new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
        steps.append(f"{value}{op}{n}={new}")
        expr = f"({expr}){op}{n}" if op in "*/" and any(c in expr for c in "+-") else f"{expr}{op}{n}"
        value = new
    return expr, value, steps


def countdown_row(rng: random.Random, count: int, max_number: int) -> dict:
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        expr, target, steps = _countdown_expr(rng, numbers)
        if 1 <= target <= 1000:
            break
    listed = ", ".join(map(str, numbers))
    return {
        "prompt": f"Using the numbers [{listed}], create an equation that equals {target}. "
                  f"Use each number exactly once with + - * /.",
        "answer": str(target),
        "numbers": numbers,
        "task": "countdown",
        "response": f"<think>{', '.join(steps)}</think><answer>{expr}</answer>",
    }


def corrupt_answer(rng: random.Random, row: dict) -> dict:
    """The same worked steps with a near-miss final answer (the `answer` column stays true).

    A cold start on such rows leaves a policy that often computes the right thing and
    then writes something else: the gap RL is meant to close, in miniature.
    """
    value = int(row["answer"])
    wrong = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
    head = row["response"].rsplit("<answer>", 1)[0]
    return {**row, "response": f"{head}<answer>{wrong}</answer>"}


def with_tool_call(row: dict) -> dict:
    """The row answered by running the expression in the python tool (rollout.tools' fenced format: the call, then
    the tool's output block) and copying what it printed."""
    expr, value = row["prompt"].removesuffix("=?"), row["answer"]
    return {**row, "response": f"<think>```python\nprint({expr})\n```\n```output\n{value}\n```\n</think>"
                               f"<answer>{value}</answer>"}


def generate(task: str, n: int, seed: int = 0, digits: int = 2, ops: str = "+",
             count: int = 3, max_number: int = 20, answer_noise: float = 0.0, tool_share: float = 0.0) -> list[dict]:
    """n distinct rows of a task; the same seed gives the same rows.

    answer_noise: the share of arithmetic rows whose worked response ends in a wrong answer.
    tool_share: the share of arithmetic rows whose worked response calls the python tool instead.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        row = arithmetic_row(rng, digits, ops) if task == "arithmetic" else countdown_row(rng, count, max_number)
        attempts += 1
        if row["prompt"] in seen and attempts < 20 * n:
            continue
        seen.add(row["prompt"])
        if tool_share and task == "arithmetic" and rng.random() < tool_share:
            row = with_tool_call(row)
        elif answer_noise and task == "arithmetic" and rng.random() < answer_noise:
            row = corrupt_answer(rng, row)
        rows.append(row)
    return rows


def split_held_out(rows: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """Hold out the last rows; prompts never appear in both parts."""
    eval_rows = rows[len(rows) - held_out:] if held_out else []
    eval_prompts = {r["prompt"] for r in eval_rows}
    train = [r for r in rows[: len(rows) - held_out] if r["prompt"] not in eval_prompts]
    return train, eval_rows
