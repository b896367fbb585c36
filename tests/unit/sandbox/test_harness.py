"""Verdicts a program cannot forge (r1cli/sandbox/harness.py): completions that try to pass HumanEval-style tests
without solving them - ending the process early, forging the server's replies, replacing the check, patching the
interpreter, a signal handler, an object equal to everything - all fail, through the harness and through the `code`
reward; the ones that end early with status 0 passed under the old mechanism (prompt + completion + test + check in
one process, judged by its exit status), which the table also shows. Tested again end to end in
tests/e2e/test_eval.py (r1 eval --completions) and with the 164 canonical solutions there."""

import pytest
from hostile_code import HOSTILE, PROBLEM

from r1cli.eval.benchmarks import call_test
from r1cli.rewards import REWARDS, RewardContext
from r1cli.sandbox import Limits
from r1cli.sandbox.harness import CallTest, decode, encode, judge_many
from r1cli.sandbox.launcher import launch_many
from r1cli.sandbox.run import run_program

FAST = Limits(wall_s=10, cpu_s=5)


def _old_verdict(completion: str) -> bool:
    """The mechanism this replaced: one process, its exit status the verdict."""
    p = PROBLEM.program
    return run_program(p["prompt"] + completion + "\n\n" + p["test"] + f"\ncheck({p['entry_point']})\n", "",
                       FAST).ok


def _judge(tests):
    return judge_many(tests, lambda jobs: launch_many(jobs, FAST))


def test_plain_data_round_trips_and_nothing_else_is_encoded():
    values = [None, True, 3, -2 ** 70, 0.1, float("inf"), "x", b"\x00\xff", [1, (2, 3)], {(1, "a"): {4}},
              frozenset({1}), {"k": [None]}]
    assert decode(encode(values)) == values and type(decode(encode((1,)))) is tuple

    class Sneaky:
        def __eq__(self, other):
            return True

    with pytest.raises(TypeError):
        encode(Sneaky())


def test_hostile_completions_fail_and_the_honest_one_passes():
    canonical = PROBLEM.program["canonical_solution"]
    verdicts = _judge([call_test(PROBLEM, c) for _, c, _ in HOSTILE] + [call_test(PROBLEM, canonical)])
    assert verdicts[-1] == (True, "passed")
    passed = [name for (name, _, _), (ok, _) in zip(HOSTILE, verdicts) if ok]
    assert passed == [], passed
    old = [name for name, c, was in HOSTILE if was and not _old_verdict(c)]
    assert old == [], f"the old mechanism no longer passes these (the table's third column is wrong): {old}"


def test_the_code_reward_judges_function_tests_by_the_harness():
    p = PROBLEM.program
    row = {"task": "code", "entry_point": p["entry_point"], "test": p["test"], "setup": "from typing import List\n"}
    accuracy = REWARDS.get("accuracy")
    ctx = RewardContext()
    solution = p["prompt"] + p["canonical_solution"]
    assert accuracy(f"<think>x</think>\n```python\n{solution}\n```", row, ctx) == 1.0
    for name, completion, _ in HOSTILE:
        program = p["prompt"] + completion
        assert accuracy(f"<think>x</think>\n```python\n{program}\n```", row, ctx) == 0.0, name


def test_a_test_whose_arguments_come_from_earlier_answers_takes_another_round():
    test = CallTest("", "def f(x):\n    return x + 1\n", "f",
                    "def check(candidate):\n    y = candidate(1)\n    assert candidate(y) == 3\n"
                    "    assert candidate(candidate(y)) == 4\n")
    assert _judge([test]) == [(True, "passed")]
    wrong = CallTest("", "def f(x):\n    return x + 2\n", "f", test.test)
    assert _judge([wrong])[0][0] is False
