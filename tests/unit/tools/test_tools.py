"""Tools and multi-turn rollouts, with a scripted engine and a character tokenizer (no model)."""

import pytest

from r1cli.interfaces import Completion, SamplingParams
from r1cli.token_batch import IGNORE, TokenBatch
from r1cli.tools import ToolLimits, call_tool
from r1cli.tools.formats import CALL_END, Fenced
from r1cli.tools.turns import TurnSettings, generate_with_tools


class Chars:
    """One token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class Scripted:
    """Answers each prompt with script(context text, turn seed) and stops at the first stop string (kept), as the
    engines do; every token's log-prob is -0.5."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.seed))
        out = []
        for i, p in enumerate(prompts):
            group = []
            for j in range(params.n):
                text = self.script("".join(map(chr, p)), j)
                for stop in params.stop:
                    if stop in text:
                        text = text[: text.index(stop) + len(stop)]
                ids = [ord(c) for c in text][: params.max_tokens]
                group.append(Completion(list(p), ids, "".join(map(chr, ids)),
                                        "length" if len(ids) < len(text) else "stop", [-0.5] * len(ids)))
            out.append(group)
        return out


def mult_script(context, j):
    """Calls the calculator once, then answers with what it read."""
    if "```output" not in context.split("Q:")[-1]:
        return "<think>use the tool</think>\n```calculator\n123456789*987654321\n```\n```output and more"
    seen = context.rsplit("```output\n", 1)[1].split("\n")[0]
    return f"<answer>{seen}</answer>"


def test_a_call_runs_the_tool_and_generation_goes_on_with_the_output_masked():
    engine = Scripted(mult_script)
    settings = TurnSettings(tools=("calculator",), max_turns=3, max_tokens=400)
    (group,) = generate_with_tools(engine, Chars(), [[ord(c) for c in "Q: 123456789*987654321?"]],
                                   SamplingParams(n=2, max_tokens=200, stop=("</answer>",), seed=5), settings)
    assert len(group) == 2
    c = group[0]
    assert c.text.endswith("```output\n121932631112635269\n```\n<answer>121932631112635269</answer>")
    assert (c.turns, c.tool_calls, c.tool_errors) == (2, 1, 0)
    obs = "".join(chr(t) for t, o in zip(c.completion_ids, c.observation) if o)
    assert obs == "\n121932631112635269\n```\n"  # exactly the tool's tokens are marked
    assert len(c.logprobs) == sum(not o for o in c.observation)  # the model's tokens only
    # two engine calls: the first turn of both samples, then both continuations together, seeded apart
    assert [(k, n) for k, n, _ in engine.calls] == [(1, 2), (2, 1)] and engine.calls[0][2] != engine.calls[1][2]
    # training scores the model's tokens only
    batch = TokenBatch.from_completions([c.prompt_ids], [c.completion_ids], [c.observation])
    assert batch.counts[0] == len(c.logprobs)
    scored = [t for t in batch.targets[0] if t != IGNORE]
    assert scored == [t for t, o in zip(c.completion_ids, c.observation) if not o]


def test_turns_and_tokens_are_bounded():
    loop = Scripted(lambda ctx, j: "```calculator\n1+1\n```\n```output")  # calls for ever
    settings = TurnSettings(tools=("calculator",), max_turns=3, max_tokens=10_000)
    (group,) = generate_with_tools(loop, Chars(), [[81]], SamplingParams(n=1, max_tokens=100), settings)
    assert (group[0].turns, group[0].tool_calls) == (3, 2)  # the third turn's call is not answered
    short = TurnSettings(tools=("calculator",), max_turns=10, max_tokens=60)
    (group,) = generate_with_tools(loop, Chars(), [[81]], SamplingParams(n=1, max_tokens=100), short)
    assert len(group[0].completion_ids) == 60 and group[0].finish_reason == "length"


@pytest.mark.parametrize("code,expect", [
    ("while True: pass", "wall time"),
    ("import os\nwhile True: os.fork()", ""),
    ("print('x' * 10_000_000)", ""),
    ("raise ValueError('boom')", "ValueError: boom"),
])
def test_a_hostile_or_failing_call_is_an_error_observation_for_that_sample(code, expect):
    obs = call_tool("python", code, [], ToolLimits(timeout_s=2, output_chars=200))
    assert obs.error and expect in obs.text and len(obs.text) < 300


def test_python_state_persists_across_a_samples_calls_only_when_asked():
    history = ["import math\nx = math.factorial(10)", "print('not shown again')"]
    assert call_tool("python", "print(x + 1)", history, ToolLimits(timeout_s=5)).text == "3628801\n"
    fresh = call_tool("python", "print(x + 1)", history, ToolLimits(timeout_s=5, persist=False))
    assert fresh.error and "NameError" in fresh.text


def test_calculator_is_exact_and_reads_only_arithmetic():
    limits = ToolLimits()
    assert call_tool("calculator", "(2**64 - 1) // 3", [], limits).text == str((2 ** 64 - 1) // 3)
    assert call_tool("calculator", "1/3 + 1/6", [], limits).text.startswith("1/2")
    for bad in ("__import__('os').system('x')", "9**9**9", "1/0"):
        assert call_tool("calculator", bad, [], limits).error


def test_a_fenced_call_is_the_last_fenced_block_before_the_marker():
    parse = Fenced().parse
    assert parse("a\n```python\nprint(1)\n```\n" + CALL_END) == [("python", "print(1)")]
    assert parse("no call here") == []
    assert parse(CALL_END) == [("", "")]


def test_a_tool_of_your_own_from_a_file_is_called_by_its_function_name(tmp_path):
    (tmp_path / "my_tools.py").write_text("def shout(call, history, limits):\n    return call.upper()\n")
    ref = f"{tmp_path / 'my_tools.py'}:shout"
    script = Scripted(lambda ctx, j: "<answer>" + ctx.rsplit("```output\n", 1)[1].split("\n")[0] + "</answer>"
                      if "```output" in ctx else "```shout\nhello\n```\n```output")
    (group,) = generate_with_tools(script, Chars(), [[81]], SamplingParams(n=1, max_tokens=100, stop=("</answer>",)),
                                   TurnSettings(tools=(ref,), max_turns=2, max_tokens=200))
    assert group[0].text.endswith("<answer>HELLO</answer>") and group[0].tool_errors == 0


def test_sft_on_a_response_with_tool_calls_has_no_loss_on_the_tools_output(tiny_model):
    from r1cli.config import DataConfig
    from r1cli.data.sft_examples import tokenize_conversation
    from r1cli.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    response = ("<think>```python\nprint(4821*7306)\n```\n```output\n35222226\n```\nso</think>"
                "<answer>35222226</answer>")
    convo = [{"role": "user", "content": "4821*7306=?"}, {"role": "assistant", "content": response}]
    ex = tokenize_conversation(tok, convo, DataConfig(template="chat"))
    targets = [t for t in ex.targets if t != IGNORE]
    trained = tok.decode(targets, skip_special_tokens=False)
    assert trained == response.replace("\n35222226\n```\n", "") + "<|im_end|>\n"  # the template's turn end
    whole = tokenize_conversation(tok, convo, DataConfig(template="chat", mask_tool_output=False))
    assert sum(t != IGNORE for t in whole.targets) > len(targets)


def test_continuations_take_as_many_rows_a_generate_call_as_the_first_turn():
    """A batching engine (transformers) sizes its calls by prompts; continuations are one row per prompt, so they
    are asked for the first turn's rows per call rather than n times fewer."""
    engine = Scripted(mult_script)
    engine.prompts_per_call = lambda prompts, n, max_tokens: 3
    seen = []
    generate = engine.generate
    engine.generate = lambda prompts, params: seen.append(params.rows_per_call) or generate(prompts, params)
    generate_with_tools(engine, Chars(), [[ord(c) for c in "Q: 1*2?"]] * 4,
                        SamplingParams(n=8, max_tokens=200, stop=("</answer>",)),
                        TurnSettings(tools=("calculator",), max_turns=3, max_tokens=400))
    assert seen == [0, 24]
