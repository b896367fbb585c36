"""`r1 eval`: metrics against hand-computed cases, scoring of equivalent forms, the public benchmark formats,
HumanEval run in the sandbox, existing completions, resume."""

import json
import math
import re

import pytest
from conftest import run_r1

from r1cli.errors import R1Error
from r1cli.eval.benchmarks import Problem, score_text
from r1cli.eval.metrics import bootstrap_ci, majority_correct, pass_at_k, summarise
from r1cli.eval.run import EvalRequest, run_eval
from r1cli.rewards import RewardContext

CTX = RewardContext()


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError, match="pass@6 needs at least 6 samples"):
        pass_at_k(5, 1, 6)


def test_majority_vote_ties_and_missing_answers():
    # 2 x "3", 2 x "4": a tie goes to the answer seen first
    assert majority_correct(["4", "3", "3", "4"], [False, True, True, False], 4) is False
    assert majority_correct(["3", "4", "4", "3"], [True, False, False, True], 4) is True
    # no answer never wins, even as the most common outcome
    assert majority_correct([None, None, "3"], [False, False, True], 3) is True
    assert majority_correct([None, None], [False, False], 2) is False
    # only the first k samples vote
    assert majority_correct(["4", "3", "3"], [False, True, True], 1) is False
    with pytest.raises(ValueError, match="cons@4 needs at least 4"):
        majority_correct(["1"] * 3, [True] * 3, 4)


def test_bootstrap_of_a_constant_and_a_spread():
    assert bootstrap_ci([0.5] * 30) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50, reps=2000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.06)  # ~ +-1.96 * sqrt(.25 / 100)


def test_summarise_reports_pass1_as_the_mean_over_samples():
    per = [{"correct": [True, False, False, False], "answers": ["1", "2", "2", "3"]},
           {"correct": [True, True, True, False], "answers": ["5", "5", "5", "6"]}]
    s = summarise(per, ks=(4,), cons=(4,))
    assert s["pass@1"]["value"] == pytest.approx((0.25 + 0.75) / 2)
    assert s["pass@4"]["value"] == 1.0 and s["cons@4"]["value"] == 0.5


MATH_TABLE = [  # (answer, gold, equal)
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "\\frac34", True), ("1,000", "1000", True),
    ("\\$1,000", "1000", True), ("50\\%", "50\\%", True), ("5 \\text{ cm}", "5", True), ("(1, 2]", "(1,2]", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True), ("x=3", "3", True), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("2", "2.0", True),
    ("[1,2)", "(1,2]", False), ("0.333", "\\frac13", False), ("3.14", "\\pi", False), ("10", "1000", False),
    ("\\frac{1}{3}", "\\frac{1}{2}", False), ("1,2", "12", False),
    ("50\\%", "50", False), ("4_2", "42", False), ("40+2", "42", False),  # one number rule in every checker
]


@pytest.mark.parametrize("answer, gold, equal", MATH_TABLE)
def test_math_scoring_of_equivalent_forms_and_near_misses(answer, gold, equal):
    ok, extracted = score_text(Problem("t", "0", "", "math", answer=gold), f"so \\boxed{{{answer}}}", CTX)
    assert extracted == answer and ok is equal


def test_yes_no_and_choice_extraction():
    yes = Problem("t", "0", "", "yesno", answer="Yes")
    assert score_text(yes, "<think>hmm</think><answer> yes </answer>", CTX) == (True, "yes")
    assert score_text(yes, "<answer>no</answer>", CTX)[0] is False
    choice = Problem("t", "0", "", "choice", answer="C")
    assert score_text(choice, "\\boxed{C}", CTX)[0] and score_text(choice, "the answer is (C)", CTX)[0]
    assert not score_text(choice, "\\boxed{B} or \\boxed{C}", CTX)[0]  # a hedge is no answer


def _he_completions(path, which):
    from r1cli.eval.benchmarks import humaneval_problems

    rows = [{"benchmark": "humaneval", "id": p.id,
             "completion": p.program["canonical_solution"] if which == "canonical" else "    pass\n"}
            for p in humaneval_problems()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(tmp_path):
    """All 164 through the command, in the sandbox pool (about 2.5 s each way on 2 cores)."""
    for which, want in (("canonical", "1.000 [1.000, 1.000]"), ("empty", "0.000 [0.000, 0.000]")):
        out = tmp_path / which
        proc = run_r1("eval", "--completions", str(_he_completions(tmp_path / f"{which}.jsonl", which)),
                      "--benchmarks", "humaneval", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "summary.json").read_text())["humaneval"]
        assert summary["problems"] == 164 and f"{summary['pass@1']['value']:.3f}" == want[:5]
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 164 and all(r["reason"] for r in rows)


def test_hostile_completions_score_zero_through_r1_eval(tmp_path):
    """The hostile table of tests/unit/sandbox/test_harness.py as samples of one HumanEval problem, through the
    command: each 0 (the old exit-status verdict passed eight of them), the honest sample 1."""
    from hostile_code import HOSTILE, PROBLEM

    rows = [{"benchmark": "humaneval", "id": PROBLEM.id, "completion": c} for _, c, _ in HOSTILE]
    rows.append({"benchmark": "humaneval", "id": PROBLEM.id, "completion": PROBLEM.program["canonical_solution"]})
    proc = run_r1("eval", "--completions", _write(tmp_path / "c.jsonl", rows), "--benchmarks", "humaneval",
                  "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in got] == [False] * len(HOSTILE) + [True], [r["reason"] for r in got]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_public_formats_are_read_and_scored(tmp_path):
    files = {
        "gsm8k": _write(tmp_path / "g.jsonl", [{"question": "2+40?", "answer": "two plus forty\n#### 42"}]),
        "arc": _write(tmp_path / "a.jsonl", [{"id": "q1", "question": {"stem": "Sky?", "choices": [
            {"label": "A", "text": "green"}, {"label": "B", "text": "blue"}]}, "answerKey": "B"}]),
        "mmlu": _write(tmp_path / "m.jsonl", [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1}]),
        "gpqa": _write(tmp_path / "q.jsonl", [{"Record ID": "r9", "Question": "Which?", "Correct Answer": "right",
                                               "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
                                               "Incorrect Answer 3": "w3"}]),
        "leetcode": _write(tmp_path / "l.jsonl", [{"id": "sum", "prompt": "Add two numbers.",
                                                   "tests": [{"input": "2 3\n", "output": "5"},
                                                             {"input": "10 -4\n", "output": "6"}]}]),
    }
    from r1cli.eval.benchmarks import load_benchmark

    gpqa = load_benchmark(f"gpqa={files['gpqa']}", None)[0]
    right_letter = gpqa.answer
    assert f"{right_letter}. right" in gpqa.prompt
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    completions = [
        {"benchmark": "gsm8k", "id": "0", "completion": "... \\boxed{42}"},
        {"benchmark": "arc", "id": "q1", "completion": "<think>x</think><answer>B</answer>"},
        {"benchmark": "mmlu", "id": "0", "completion": "The answer is (B)."},
        {"benchmark": "gpqa", "id": "r9", "completion": f"\\boxed{{{right_letter}}}"},
        {"benchmark": "leetcode", "id": "sum", "completion": good},
        {"benchmark": "leetcode", "id": "sum", "completion": good.replace("a + b", "a * b")},
    ]
    summary = run_eval(EvalRequest(tuple(f"{k}={v}" for k, v in files.items()), str(tmp_path / "out"),
                                   completions=_write(tmp_path / "c.jsonl", completions)))
    assert {k: v["pass@1"]["value"] for k, v in summary.items()} == \
        {"gsm8k": 1.0, "arc": 1.0, "mmlu": 1.0, "gpqa": 1.0, "leetcode": 0.5}


def test_bad_benchmark_inputs_are_one_clear_line(tmp_path):
    with pytest.raises(R1Error, match=r"benchmark aime24: file not found: /nope.jsonl \(expected rows with problem"):
        run_eval(EvalRequest(("aime24=/nope.jsonl",), str(tmp_path), completions="x"))
    with pytest.raises(R1Error, match=r"unknown benchmark 'aime2024'.*did you mean 'aime24'"):
        run_eval(EvalRequest(("aime2024",), str(tmp_path), completions="x"))
    with pytest.raises(R1Error, match="give --model .* or --completions"):
        run_eval(EvalRequest(("humaneval",), str(tmp_path)))
    bad = _write(tmp_path / "c.jsonl", [{"benchmark": "humaneval", "id": "HumanEval/999", "completion": ""}])
    with pytest.raises(R1Error, match="no problem 'HumanEval/999' in benchmark 'humaneval'"):
        run_eval(EvalRequest(("humaneval",), str(tmp_path / "o"), completions=bad))


GOOD_GPQA = {"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b", "Incorrect Answer 2": "c",
             "Incorrect Answer 3": "d"}


@pytest.mark.parametrize("bench, row, message", [
    ("math500", {"problem": "1+1?"}, "no field 'answer'"),
    ("gsm8k", {"question": "1+1?", "answer": 2}, "malformed row"),
    ("aime24", {"problem": "1+1?", "answer": ["2"]}, "the answer must be a non-empty string or number"),
    ("gpqa", {k: v for k, v in GOOD_GPQA.items() if k != "Incorrect Answer 2"}, "no field 'Incorrect Answer 2'"),
    ("arc", {"question": {"stem": "q", "choices": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}]},
             "answerKey": "E"}, "answerKey 'E' is none of the choices"),
    ("mmlu", {"question": "q", "choices": ["x", "y"], "answer": "Z"}, "answer 'Z' is not a choice letter"),
    ("mmlu", {"question": "q", "choices": ["x", "y"], "answer": 7}, "the answer is choice 8 of 2"),
    ("leetcode", {"prompt": "p"}, "tests must be a non-empty list"),
    ("jsonl", {"prompt": "p", "answer": "1", "task": "algebra"}, "task 'algebra' has no checker"),
])
def test_a_malformed_benchmark_row_is_its_file_and_line(tmp_path, bench, row, message):
    path = _write(tmp_path / "b.jsonl", [GOOD_GPQA if bench == "gpqa" else row, row] if bench == "gpqa" else [row])
    line = 2 if bench == "gpqa" else 1
    with pytest.raises(R1Error, match=f"{path}:{line}: .*{re.escape(message)}"):
        run_eval(EvalRequest((f"{bench}={path}",), str(tmp_path / "o"), completions="x"))


def test_humaneval_and_completions_rows_without_their_fields_are_errors(tmp_path):
    he = _write(tmp_path / "he.jsonl", [{"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f"}])
    with pytest.raises(R1Error, match=f"{he}:1: no field 'test'"):
        run_eval(EvalRequest((f"humaneval={he}",), str(tmp_path / "o"), completions="x"))
    bench = _write(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "so #### 2"}])
    comp = _write(tmp_path / "c.jsonl", [{"benchmark": "gsm8k", "id": "0"}])  # no completion: not a wrong one
    with pytest.raises(R1Error, match=f"{comp}:1: needs completion"):
        run_eval(EvalRequest((f"gsm8k={bench}",), str(tmp_path / "o2"), completions=comp))


def test_scoring_resumes_without_repeating_or_losing(tmp_path):
    """A run cut off part-way (here: a torn last line and a problem with only some of its samples) is
    completed by the same command: every (problem, sample) exactly once."""
    data = _write(tmp_path / "g.jsonl", [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(6)])
    comps = _write(tmp_path / "c.jsonl", [{"benchmark": "gsm8k", "id": str(i), "completion": f"\\boxed{{{i + 1}}}"}
                                          for i in range(6) for _ in range(2)])
    req = EvalRequest((f"gsm8k={data}",), str(tmp_path / "out"), completions=comps)
    run_eval(req)
    samples = tmp_path / "out" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])  # problems 0-2 whole, 3 half, a torn line
    summary = run_eval(req)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted((r["id"], r["sample"]) for r in rows) == [(str(i), j) for i in range(6) for j in range(2)]
    assert summary["gsm8k"]["problems"] == 6 and summary["gsm8k"]["pass@1"]["value"] == 1.0


def test_two_data_parallel_ranks_split_the_problems_and_agree_with_one(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    comps = _he_completions(tmp_path / "canonical.jsonl", "canonical")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "r1cli.cli",
           "eval", "--completions", str(comps), "--benchmarks", "humaneval", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [[json.loads(line)["id"] for line in (tmp_path / "two" / f"samples.rank{r}.jsonl").read_text().splitlines()
               if line] for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 82 and not set(shards[0]) & set(shards[1])
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["humaneval"]
    assert two["problems"] == 164 and two["pass@1"]["value"] == 1.0
