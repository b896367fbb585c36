"""`r1 data prepare`: the public math layouts R1 users train on, as r1 rows.

MATH (problem, solution), NuminaMath (problem, solution, answer in 1.5), OpenR1-Math (problem, solution, answer) and
DeepScaleR (problem, answer, solution) all name the question `problem` (some sets: `question`) and the final answer
`answer`, or leave it inside the worked solution's last `\\boxed{}`. Each row becomes {prompt, answer, task,
response}; a row without a usable question or final answer is dropped, and every reason is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from r1cli.data.records import read_records, write_jsonl
from r1cli.errors import R1Error
from r1cli.parsing import all_boxed

PROBLEM_COLUMNS = ("problem", "question", "prompt", "query")
SOLUTION_COLUMNS = ("solution", "response", "reasoning", "generation")
NOT_AN_ANSWER = {"", "proof", "notfound", "none", "null", "n/a"}  # NuminaMath-1.5 marks proofs and unknowns so


@dataclass
class Prepared:
    rows: list[dict]
    read: int
    dropped: Counter = field(default_factory=Counter)


def _first(row: dict, names: tuple[str, ...], chosen: str) -> str | None:
    for name in (chosen,) if chosen else names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def prepare_rows(rows, task: str = "math", problem_column: str = "", answer_column: str = "answer",
                 solution_column: str = "") -> Prepared:
    out, dropped, seen = [], Counter(), set()
    for row in rows:
        problem = _first(row, PROBLEM_COLUMNS, problem_column)
        if problem is None:
            dropped["no question (" + (problem_column or "/".join(PROBLEM_COLUMNS)) + ")"] += 1
            continue
        solution = _first(row, SOLUTION_COLUMNS, solution_column)
        raw = row.get(answer_column)
        answer = str(raw).strip() if raw is not None and not isinstance(raw, (list, dict)) else ""
        if answer.lower() in NOT_AN_ANSWER:
            if answer.lower() in ("proof", "notfound"):
                dropped[f"answer column says {answer.lower()!r}"] += 1
                continue
            boxed = all_boxed(solution) if solution else []
            if not boxed:
                dropped["no final answer (no answer column, no \\boxed{} in the solution)"] += 1
                continue
            answer = boxed[-1].strip()  # the worked solution's last box is its final answer
            if not answer:
                dropped["an empty \\boxed{}"] += 1
                continue
        if problem in seen:
            dropped["the same question again"] += 1
            continue
        seen.add(problem)
        new = {"prompt": problem, "answer": answer, "task": task}
        if solution:
            new["response"] = solution
        out.append(new)
    return Prepared(out, len(rows), dropped)


def prepare(source: str, out: str, **options) -> Prepared:
    """Read `source` (any format r1 reads), write the r1 rows to `out` (JSONL, atomically)."""
    result = prepare_rows(read_records(source), **options)
    if not result.rows:
        reasons = "; ".join(f"{n} {why}" for why, n in result.dropped.most_common())
        raise R1Error(f"{source}: no row could be prepared ({reasons})")
    write_jsonl(result.rows, out)
    return result
