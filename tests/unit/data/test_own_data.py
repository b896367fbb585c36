"""Data as users have it: save_to_disk folders and Arrow files, renamed columns, chat-style rows as RL prompts,
chat template variables and files, and `r1 data prepare` for the public math layouts."""

import json

import pytest

from r1cli.config import load_config
from r1cli.data.records import read_data, read_records
from r1cli.errors import R1Error

ROWS = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2+3?", "answer": "5"}]


def test_a_save_to_disk_folder_an_arrow_file_and_renamed_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    data = load_config(None, ["data.columns={problem: prompt}"]).data
    rows = read_data(str(tmp_path / "saved"), data)
    assert list(rows) == [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+3?", "answer": "5"}]
    assert rows.where(1) == f"{tmp_path / 'saved'}/data-00000-of-00001.arrow:2"
    arrow = tmp_path / "saved" / "data-00000-of-00001.arrow"
    assert list(read_records(str(arrow))) == ROWS  # one Arrow file alone
    with pytest.raises(R1Error, match="holds a DatasetDict \\(train, test\\): name one split's folder"):
        read_records(str(tmp_path / "dict"))
    assert list(read_records(str(tmp_path / "dict" / "test"))) == ROWS
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(R1Error, match="bad.arrow: not a readable Arrow file"):
        read_records(str(tmp_path / "bad.arrow"))


def test_a_chat_style_row_prompts_with_its_conversation(tiny_model):
    from r1cli.data.prompts import encode_prompts
    from r1cli.data.records import Records
    from r1cli.data.templates import prompt_text
    from r1cli.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    data = load_config(None, ["data.system_prompt=Be brief."]).data
    chat = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]
    rows = Records([{"messages": chat, "answer": "2"}, {"prompt": "What is 1+1?"}], "x.jsonl", [1, 2])
    a, b = encode_prompts(tok, rows, data)
    assert a == b  # the reference answer is not part of the prompt; the system prompt is added to both
    assert prompt_text(rows[0], data) == "What is 1+1?"
    with pytest.raises(R1Error, match="x.jsonl:1: row has no field 'prompt'"):
        encode_prompts(tok, Records([{"question": "?"}], "x.jsonl", [1]), data)


def test_chat_template_variables_and_a_template_file_reach_the_prompt(tiny_model, tmp_path):
    from r1cli.data.templates import render_prompt
    from r1cli.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    own = tmp_path / "t.jinja"
    own.write_text("{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}"
                   "{% if add_generation_prompt %}{% if enable_thinking %}<think>{% else %}<nothink>{% endif %}"
                   "{% endif %}")
    think = load_config(None, [f"data.chat_template={own}", "data.chat_template_kwargs={enable_thinking: true}"])
    quiet = load_config(None, [f"data.chat_template={own}", "data.chat_template_kwargs={enable_thinking: false}"])
    assert render_prompt(tok, "hi", think.data) == "[user|hi]<think>"
    assert render_prompt(tok, "hi", quiet.data) == "[user|hi]<nothink>"
    with pytest.raises(R1Error, match="data.chat_template: file not found"):
        render_prompt(tok, "hi", load_config(None, [f"data.chat_template={tmp_path / 'none.jinja'}"]).data)


def test_prepare_takes_the_public_math_layouts_and_counts_what_it_drops(tmp_path):
    from r1cli.data.prepare import prepare

    src = [
        {"problem": "Find x.", "solution": "So \\boxed{1} then \\boxed{\\frac{1}{2}}.", "level": "Level 3"},  # MATH
        {"problem": "Sum?", "solution": "...", "answer": "7", "source": "olympiads"},  # NuminaMath-1.5
        {"problem": "Prove it.", "solution": "...", "answer": "proof"},
        {"problem": "Find y.", "solution": "no box here"},
        {"question": "Find z.", "answer": 3},  # DeepScaleR-like, an int answer
        {"problem": "Sum?", "answer": "7"},  # the same question again
        {"solution": "\\boxed{4}"},
    ]
    (tmp_path / "src.jsonl").write_text("".join(json.dumps(r) + "\n" for r in src))
    got = prepare(str(tmp_path / "src.jsonl"), str(tmp_path / "out.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in rows] == [("Find x.", "\\frac{1}{2}"), ("Sum?", "7"), ("Find z.", "3")]
    assert all(r["task"] == "math" for r in rows) and rows[0]["response"].startswith("So ")
    assert got.read == 7 and sum(got.dropped.values()) == 4
    assert got.dropped["answer column says 'proof'"] == 1 and got.dropped["the same question again"] == 1
    assert got.dropped["no final answer (no answer column, no \\boxed{} in the solution)"] == 1
    assert got.dropped["no question (problem/question/prompt/query)"] == 1
