import pytest

from r1cli.errors import R1Error
from r1cli.rewards import REWARDS, RewardContext, extract_answer, score
from r1cli.rewards.answers import countdown_reward, math_reward
from r1cli.rewards.rules import format_reward, language_reward, partial_format_reward

CTX = RewardContext()


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("so the answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_answer("<answer>the sum is \\boxed{7}</answer>") == "7"
    assert extract_answer("no answer here") is None


def test_math_reward_is_symbolic():
    row = {"answer": "\\frac{1}{2}"}
    assert math_reward("<think>..</think><answer>0.5</answer>", row, CTX) == 1.0
    assert math_reward("<think>..</think><answer>$\\frac{2}{4}$</answer>", row, CTX) == 1.0
    assert math_reward("<think>..</think><answer>1/3</answer>", row, CTX) == 0.0
    assert math_reward("the answer is \\boxed{\\frac12}", row, CTX) == 1.0


def test_strict_format_and_prefill():
    good = "<think>a</think>\n<answer>b</answer>"
    assert format_reward(good, {}, CTX) == 1.0
    for bad in ["<think>a</think>", "<answer>b</answer>", "x<think>a</think><answer>b</answer>",
                "<think>a<think>b</think><answer>c</answer>", "<think>a</think><answer>b</answer> trailing"]:
        assert format_reward(bad, {}, CTX) == 0.0, bad
    # the chat template already opened <think>: the completion starts inside it
    assert format_reward("a</think><answer>b</answer>", {}, RewardContext(prefill="<think>")) == 1.0
    assert partial_format_reward("<think>a</think>", {}, CTX) == 0.5


def test_language_consistency():
    few = RewardContext(language_min_words=4)
    assert language_reward("<think>first add the units</think><answer>1</answer>", {}, few) == 1.0
    mixed = "<think>first 我们 add</think><answer>1</answer>"
    assert language_reward(mixed, {}, few) == pytest.approx(2 / 4)
    assert language_reward(mixed, {}, RewardContext(language="zh", language_min_words=4)) == pytest.approx(2 / 4)
    assert language_reward("no tags", {}, CTX) == 0.0


@pytest.mark.parametrize("cot", ["", "   ", "123 456 = 579", "3+5=8, 6+1=7", "first add the units"])
def test_the_language_reward_needs_a_real_amount_of_reasoning(cot):
    """An empty, digits-only or few-word chain of thought is not reasoning in any language (default: 8 words)."""
    assert language_reward(f"<think>{cot}</think><answer>42</answer>", {}, CTX) == 0.0
    assert language_reward(f"<think>{cot} and then carry the one into the tens</think><answer>42</answer>", {},
                           CTX) == 1.0


def test_countdown_checker():
    row = {"answer": "24", "numbers": [4, 6, 1]}
    assert countdown_reward("<answer>4*6*1</answer>", row, CTX) == 1.0
    assert countdown_reward("<answer>(6-1)*4+4</answer>", row, CTX) == 0.0  # reuses 4
    assert countdown_reward("<answer>4*6</answer>", row, CTX) == 0.0  # 1 unused
    assert countdown_reward("<answer>__import__('os')</answer>", row, CTX) == 0.0
    assert countdown_reward("<answer>4/(1-1)*6</answer>", {"answer": "24", "numbers": [4, 1, 1, 6]}, CTX) == 0.0


def test_a_raising_reward_is_that_samples_zero():
    @REWARDS.register("test_flaky")
    def flaky(completion, row, ctx):
        if "boom" in completion:
            raise RuntimeError("checker crashed")
        return 1.0

    try:
        s = score(["ok", "boom", "ok"], [{}, {}, {}], {"test_flaky": 2.0}, CTX)
        assert s.total == [2.0, 0.0, 2.0]
        assert s.failures == {"test_flaky": 1} and "checker crashed" in s.last_error["test_flaky"]
    finally:
        REWARDS.unregister("test_flaky")


def test_unknown_reward_name():
    with pytest.raises(R1Error, match="unknown reward 'formt'.*did you mean 'format'"):
        REWARDS.check("formt")


# Reward hacking holes: each completion tries to score accuracy without one clear, right final answer.
# (completion, row) -> the accuracy reward must be 0; the honest twin beside it scores 1.
MATH42, ARITH42 = {"answer": "42", "task": "math"}, {"answer": "42", "task": "arithmetic"}
HOLES = [
    # a boxed answer inside the reasoning, no <answer>: the fallback must not reach into <think>
    ("<think>maybe \\boxed{3}</think>", "<think>x</think> \\boxed{3}", {"answer": "3", "task": "math"}),
    ("<think>it is \\boxed{3}", "<think>x</think><answer>3</answer>", {"answer": "3", "task": "math"}),
    # two final answers, the last right: hedging is wrong
    ("<think>x</think><answer>\\boxed{4} or \\boxed{3}</answer>", "<think>x</think><answer>\\boxed{3}</answer>",
     {"answer": "3", "task": "math"}),
    ("<think>x</think><answer>4</answer><answer>3</answer>", "<think>x</think><answer>3</answer>",
     {"answer": "3", "task": "math"}),
    ("\\boxed{4} or maybe \\boxed{3}", "so \\boxed{3}", {"answer": "3", "task": "math"}),
    ("<answer>4</answer> <answer>3</answer>", "<answer>3</answer>", {"answer": "3", "task": "arithmetic"}),
    # a second answer after a second think, or one inside the reasoning beside the final one: more than one
    # <answer> block anywhere is no answer
    ("<think>x</think><answer>41</answer><think>no</think><answer>42</answer>",
     "<think>x</think><think>no</think><answer>42</answer>", MATH42),
    ("<think>x</think><answer>41</answer><think>no</think><answer>42</answer>",
     "<think>x</think><answer>42</answer>", ARITH42),
    ("<think>maybe <answer>42</answer></think><answer>42</answer>", "<think>maybe 42</think><answer>42</answer>",
     MATH42),
    # commas are thousands separators only
    ("<answer>1,2</answer>", "<answer>12</answer>", {"answer": "12", "task": "arithmetic"}),
    ("<answer>12,34</answer>", "<answer>1,234</answer>", {"answer": "1234", "task": "arithmetic"}),
    # an answer block inside the reasoning (closed, prefilled or never closed) is not a final answer
    ("<think>I guess <answer>42</answer> maybe</think>", "<think>I guess</think><answer>42</answer>", MATH42),
    ("<think>I guess <answer>42</answer> maybe", "<think>I guess</think><answer>42</answer>", MATH42),
    ("I guess <answer>42</answer> maybe</think>", "I guess</think><answer>42</answer>", MATH42),  # <think> prefill
    # a box beside the answer block, in it beside another number, or another answer after it
    ("<think>x</think><answer>42</answer> \\boxed{43}", "<think>x</think><answer>42</answer>", MATH42),
    ("<think>x</think>so \\boxed{43} <answer>42</answer>", "<think>x</think>so <answer>42</answer>", MATH42),
    ("<think>x</think><answer>43, i.e. \\boxed{42}</answer>", "<think>x</think><answer>so \\boxed{42}</answer>",
     MATH42),
    ("<think>x</think><answer>42</answer> Actually it is 43.", "<think>x</think><answer>42</answer> That is 42.",
     MATH42),
    ("<think>x</think>\\boxed{42} no wait, 43", "<think>x</think>\\boxed{42}, done", MATH42),
    # one rule for numbers in both checkers: written out (thousands commas, decimals, fractions), equal by value;
    # an expression still to compute, digit grouping and a percent sign are not the number
    ("<answer>4_2</answer>", "<answer>42.0</answer>", ARITH42),
    ("<answer>4_2</answer>", "<answer>42.0</answer>", MATH42),
    ("<answer>40+2</answer>", "<answer>\\frac{84}{2}</answer>", ARITH42),
    ("<answer>40+2</answer>", "<answer>\\frac{84}{2}</answer>", MATH42),
    ("<answer>42\\%</answer>", "<answer>$42$</answer>", ARITH42),
    ("<answer>42\\%</answer>", "<answer>$42$</answer>", MATH42),
]


@pytest.mark.parametrize("hack, honest, row", HOLES)
def test_reward_hacking_holes_are_closed(hack, honest, row):
    accuracy = REWARDS.get("accuracy")
    assert accuracy(hack, row, CTX) == 0.0, hack
    assert accuracy(honest, row, CTX) == 1.0, honest


def test_prefilled_think_counts_as_reasoning():
    ctx = RewardContext(prefill="<think>")
    accuracy = REWARDS.get("accuracy")
    assert accuracy("so \\boxed{3}", {"answer": "3", "task": "math"}, ctx) == 0.0  # still inside <think>
    assert accuracy("x</think> \\boxed{3}", {"answer": "3", "task": "math"}, ctx) == 1.0


@pytest.mark.parametrize("text", [
    "<think>a <answer>1</answer></think><answer>42</answer>",
    "<think>a</think><answer>42 <think>x</think></answer>",
    "<think>a</think><answer>42 </answer></answer>",
    "<think>a <think>b</think><answer>42</answer>",
])
def test_strict_format_rejects_nested_tags(text):
    assert format_reward(text, {}, CTX) == 0.0


def test_currency_sign_is_not_a_false_negative():
    row = {"answer": "1000", "task": "math"}
    assert math_reward("<answer>\\$1000</answer>", row, CTX) == 1.0
    assert math_reward("<answer>1000</answer>", {"answer": "\\$1000"}, CTX) == 1.0
    assert math_reward("<answer>\\$1001</answer>", row, CTX) == 0.0


def test_code_reward_runs_the_program_in_the_sandbox():
    accuracy = REWARDS.get("accuracy")
    row = {"task": "code", "tests": [{"input": "2 3\n", "output": "5"}, {"input": "7 -7\n", "output": "0"}]}
    good = "<think>add</think><answer>```python\na, b = map(int, input().split())\nprint(a + b)\n```</answer>"
    assert accuracy(good, row, CTX) == 1.0
    assert accuracy(good.replace("a + b", "a - b"), row, CTX) == 0.0  # passes one test of two
    assert accuracy(good.replace("print(a + b)", "raise SystemExit(3)"), row, CTX) == 0.0
    # a program inside the reasoning is not the answer
    assert accuracy("<think>```python\nprint(5)\n```</think>", {"task": "code", "tests": [row["tests"][0]]},
                    CTX) == 0.0


def test_a_batch_reward_scores_the_step_at_once_and_a_failing_batch_costs_one_sample():
    from r1cli.rewards import reward

    calls = []

    @reward("test_batch", batch=True)
    def lengths(completions, rows, ctx):
        calls.append(len(completions))
        if any("boom" in c for c in completions):
            raise RuntimeError("the model server dropped a sample")
        return [len(c) for c in completions]

    try:
        s = score(["ab", "abc", "a"], [{}, {}, {}], {"test_batch": 1.0}, CTX)
        assert s.total == [2.0, 3.0, 1.0] and calls == [3] and s.failures == {}
        calls.clear()
        s = score(["ab", "boom", "a"], [{}, {}, {}], {"test_batch": 1.0}, CTX)
        assert s.total == [2.0, 0.0, 1.0] and calls == [3, 1, 1, 1]  # the batch, then one at a time
        assert s.failures == {"test_batch": 1} and "dropped a sample" in s.last_error["test_batch"]
    finally:
        REWARDS.unregister("test_batch")


def test_a_reward_past_its_time_limit_or_not_a_number_is_that_samples_zero():
    import time

    from r1cli.rewards import reward

    @reward("test_slow")
    def slow(completion, row, ctx):
        if completion == "hang":
            time.sleep(30)
        if completion == "nan":
            return float("nan")
        return 1.0

    try:
        t0 = time.monotonic()
        s = score(["ok", "hang", "ok", "nan", "ok"], [{}] * 5, {"test_slow": 1.0}, CTX, timeout_s=0.5)
        assert time.monotonic() - t0 < 5
        assert s.total == [1.0, 0.0, 1.0, 0.0, 1.0] and s.failures == {"test_slow": 2}
        assert "not a finite number" in s.last_error["test_slow"]
        s = score(["hang"], [{}], {"test_slow": 1.0}, CTX, timeout_s=0.2)
        assert "timeout: over rewards.timeout_s=0.2 s" in s.last_error["test_slow"]
    finally:
        REWARDS.unregister("test_slow")


def test_a_batch_reward_past_its_limit_is_zero_for_the_batch_without_a_retry_per_sample():
    import time

    from r1cli.rewards import reward

    calls = []

    @reward("test_hung_batch", batch=True)
    def hung(completions, rows, ctx):
        calls.append(len(completions))
        time.sleep(30)

    try:
        t0 = time.monotonic()
        s = score(["a", "b", "c"], [{}] * 3, {"test_hung_batch": 1.0}, CTX, timeout_s=0.2)
        assert time.monotonic() - t0 < 3 and calls == [3]
        assert s.total == [0.0, 0.0, 0.0] and s.failures == {"test_hung_batch": 3}
        assert "timeout: over rewards.timeout_s=0.2 s per sample, 3 samples" in s.last_error["test_hung_batch"]
    finally:
        REWARDS.unregister("test_hung_batch")
