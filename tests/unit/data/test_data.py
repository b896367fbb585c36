import pytest

from r1cli.config import DataConfig
from r1cli.data.records import read_records, write_jsonl
from r1cli.data.sft_examples import IGNORE, tokenize_conversation
from r1cli.data.synth import generate, split_held_out
from r1cli.data.templates import R1_ZERO_TEMPLATE, render_prompt
from r1cli.errors import R1Error
from r1cli.rewards import RewardContext
from r1cli.rewards.answers import arithmetic_reward, countdown_reward


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(R1Error, match=r"bad.jsonl:3: malformed JSON line"):
        read_records(str(p))


def test_parquet_and_jsonl_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = generate("arithmetic", 20, seed=3)
    write_jsonl(rows, tmp_path / "a.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert read_records(str(tmp_path / "a.jsonl")) == read_records(str(tmp_path / "a.parquet")) == rows


def test_synthetic_answers_are_exact():
    ctx = RewardContext()
    for row in generate("arithmetic", 200, seed=1, digits=3, ops="+-*"):
        assert int(row["answer"]) == eval(row["prompt"][:-2])  # the row's own arithmetic
        assert arithmetic_reward(row["response"], row, ctx) == 1.0
    for row in generate("countdown", 200, seed=2, count=4):
        assert countdown_reward(row["response"], row, ctx) == 1.0  # the worked solution checks out


def test_held_out_split_is_disjoint():
    train, held = split_held_out(generate("arithmetic", 300, seed=0), 50)
    assert len(held) == 50 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_r1_zero_template_is_the_papers():
    cfg = DataConfig(template="r1_zero")
    text = render_prompt(None, "What is 2+2?", cfg)
    assert text.startswith("A conversation between User and Assistant. The user asks a question, and the "
                           "Assistant solves it. The assistant first thinks about the reasoning process in the "
                           "mind and then provides the user with the answer.")
    assert text.endswith("<answer> answer here </answer>. User: What is 2+2?. Assistant:")
    assert "{prompt}" in R1_ZERO_TEMPLATE


def test_loss_only_on_assistant_tokens(tiny_model):
    from r1cli.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    msgs = [{"role": "user", "content": "12+30=?"},
            {"role": "assistant", "content": "<think>2+0=2, 1+3=4</think><answer>42</answer>"}]
    ex = tokenize_conversation(tok, msgs, DataConfig(template="chat", max_seq_len=512))
    trained = [t for t in ex.targets if t != IGNORE]
    # exactly the assistant content plus the end-of-turn token are targets
    want = tok(msgs[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained[: len(want)] == want
    assert tok.decode(trained).startswith("<think>") and "12+30" not in tok.decode(trained)
