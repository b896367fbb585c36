"""The chat format of tool calls (rollout.tool_format=chat): the model's own <tool_call> JSON, the tools described
by its chat template, the answers rendered by it - here Qwen2.5's template (tests/data/qwen2_5_tools.jinja, as
Qwen ships it) over the tiny model's tokenizer, whose end-of-turn token is <|im_end|> as Qwen's is."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from r1cli.config import DataConfig, RolloutConfig
from r1cli.data.templates import render_prompt
from r1cli.errors import R1Error
from r1cli.interfaces import Completion, SamplingParams
from r1cli.models.loading import load_tokenizer
from r1cli.tools import with_tool_schemas
from r1cli.tools.turns import with_tools

QWEN = str(Path(__file__).parents[2] / "data" / "qwen2_5_tools.jinja")


class ScriptedChat:
    """Answers each prompt with script(context text) + the end-of-turn token, as an instruct model does."""

    def __init__(self, tok, script, eos=True):
        self.tok, self.script, self.calls, self.eos = tok, script, 0, eos

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for p in prompts:
            text = self.script(self.tok.decode(p, skip_special_tokens=False))
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] * self.eos
            out.append([Completion(list(p), ids, text, "stop", [-0.5] * len(ids)) for _ in range(params.n)])
        return out


def call(name, **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def two_calls_then_answer(context):
    """Two calls in the first turn (Qwen's parallel calls), then the answer built from what came back."""
    if "<tool_response>" not in context:
        return "<think>two products</think>\n" + call("calculator", expression="123456789*987654321") + "\n" + \
            call("python", code="print(2**100)")
    seen = [part.split("</tool_response>")[0].strip() for part in context.split("<tool_response>\n")[1:]]
    return "<answer>" + ",".join(seen) + "</answer>"


@pytest.fixture(scope="module")
def qwen(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    rollout = RolloutConfig(tools=["calculator", "python"], tool_format="chat", max_new_tokens=600)
    data = DataConfig(template="chat", chat_template=QWEN)
    return tok, rollout, data


def test_the_prompt_describes_the_tools_as_the_chat_template_does(qwen):
    tok, rollout, data = qwen
    text = render_prompt(tok, "What is 123456789*987654321?", with_tool_schemas(data, rollout))
    assert "# Tools" in text and "<tool_call>" in text
    tools = [json.loads(line) for line in text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert [t["function"]["name"] for t in tools] == ["calculator", "python"]
    assert tools[1]["function"]["parameters"]["required"] == ["code"]
    assert "# Tools" not in render_prompt(tok, "x", data)  # without tools the prompt is the plain chat one


def test_calls_in_the_models_format_are_answered_as_its_chat_template_renders_the_conversation(qwen):
    tok, rollout, data = qwen
    engine = with_tools(ScriptedChat(tok, two_calls_then_answer), tok, rollout, data)
    prompt = render_prompt(tok, "Q?", with_tool_schemas(data, rollout))
    (group,) = engine.generate([tok(prompt, add_special_tokens=False)["input_ids"]],
                               SamplingParams(n=2, max_tokens=600, seed=0))
    c = group[0]
    assert (c.turns, c.tool_calls, c.tool_errors) == (2, 2, 0)
    assert c.text.endswith(f"<answer>121932631112635269,{2 ** 100}</answer>")
    # the sequence is, token for token, the conversation as the template renders it: user, the assistant's
    # turn with its calls, both tool answers in one user turn, the assistant's answer
    first, second = two_calls_then_answer(""), c.text.rsplit("\n", 1)[-1]
    convo = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": first},
             {"role": "tool", "content": "121932631112635269"}, {"role": "tool", "content": f"{2 ** 100}\n"},
             {"role": "assistant", "content": second}]
    expect = tok.apply_chat_template(convo, tokenize=False, chat_template=Path(QWEN).read_text(),
                                     tools=with_tool_schemas(data, rollout).chat_template_kwargs["tools"])
    got = tok.decode(c.prompt_ids + c.completion_ids, skip_special_tokens=False)
    assert got + "\n" == expect
    # the observation is exactly the template's text between the two assistant turns, the model's end-of-turn
    # token is the model's (trained), the next assistant header the observation's
    obs = tok.decode([t for t, o in zip(c.completion_ids, c.observation) if o], skip_special_tokens=False)
    assert obs == ("\n<|im_start|>user\n<tool_response>\n121932631112635269\n</tool_response>\n<tool_response>\n"
                   f"{2 ** 100}\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    model_ids = [t for t, o in zip(c.completion_ids, c.observation) if not o]
    assert model_ids.count(tok.eos_token_id) == 2 and len(c.logprobs) == len(model_ids)


def test_a_broken_or_unknown_call_is_an_error_answer_for_that_sample(qwen):
    tok, rollout, data = qwen
    script = ScriptedChat(tok, lambda ctx: "<answer>done</answer>" if "<tool_response>" in ctx else
                          "<tool_call>\n{not json}\n</tool_call>\n" + call("search", query="x") + "\n" +
                          call("python", script="print(1)", lang="py"))
    (group,) = with_tools(script, tok, rollout, data).generate([[5, 6]], SamplingParams(n=1, max_tokens=600))
    c = group[0]
    assert (c.tool_calls, c.tool_errors) == (3, 3) and c.text.endswith("<answer>done</answer>")
    obs = tok.decode([t for t, o in zip(c.completion_ids, c.observation) if o], skip_special_tokens=False)
    assert "not JSON" in obs and "no tool 'search'" in obs and "takes one argument, 'code'" in obs


def test_a_turn_cut_by_the_token_budget_calls_nothing(qwen):
    tok, rollout, data = qwen
    script = ScriptedChat(tok, lambda ctx: call("python", code="print(1)"))
    engine = with_tools(script, tok, replace(rollout, max_new_tokens=8), data)
    (group,) = engine.generate([[5]], SamplingParams(n=1, max_tokens=8))
    assert group[0].tool_calls == 0 and script.calls == 1


def test_a_chat_template_without_tool_messages_is_refused_in_one_line(qwen):
    tok, rollout, _ = qwen
    with pytest.raises(R1Error, match="ignores the tools.*tool_format=fenced"):
        with_tools(ScriptedChat(tok, str), tok, rollout, DataConfig(template="chat"))  # the tiny model's own


def test_an_engine_that_leaves_the_end_of_turn_token_out_still_gets_its_calls_answered(qwen):
    """The turn ended (finish_reason stop) but its ids lack <|im_end|>: the call is answered and the observation
    carries the template's end of turn itself, so the sequence is still the template's conversation."""
    tok, rollout, data = qwen
    engine = with_tools(ScriptedChat(tok, two_calls_then_answer, eos=False), tok, rollout, data)
    (group,) = engine.generate([tok(render_prompt(tok, "Q?", with_tool_schemas(data, rollout)),
                                    add_special_tokens=False)["input_ids"]], SamplingParams(n=1, max_tokens=600))
    c = group[0]
    assert c.tool_calls == 2 and c.text.endswith(f"<answer>121932631112635269,{2 ** 100}</answer>")
    obs = tok.decode([t for t, o in zip(c.completion_ids, c.observation) if o], skip_special_tokens=False)
    assert obs.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n121932631112635269\n")
