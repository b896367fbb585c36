"""r1 coldstart: the readable format, few-shot prompts, filters and verification on real rows, a generator
model with a reflecting second pass, and clear errors."""

import json

import pytest
from conftest import run_r1

from r1cli.coldstart.loop import Generator, build_coldstart_data
from r1cli.coldstart.readable import few_shot_prompt, readable
from r1cli.config import DataConfig, load_config
from r1cli.errors import R1Error
from r1cli.models.loading import load_tokenizer
from r1cli.run.metrics import read_metrics


@pytest.mark.parametrize("raw, want", [
    ("<think> add units \n\n\n\nthen tens  </think>\n<answer> 42 </answer>",
     "<think>add units\n\nthen tens</think><answer>42</answer>"),
    ("units first, 2+0=2, then 4\n<answer>42</answer>",
     "<think>units first, 2+0=2, then 4</think><answer>42</answer>"),
    ("<think>so we get x = \\boxed{\\frac{1}{2}}",
     "<think>so we get x = \\boxed{\\frac{1}{2}}</think><answer>\\boxed{\\frac{1}{2}}</answer>"),
    ("<think>4 tens and 2 units.\nFinal answer: 42.\n</think>",
     "<think>4 tens and 2 units.\nFinal answer: 42.</think><answer>42</answer>"),
    ("<think>I am not sure</think>", "<think>I am not sure</think><answer></answer>"),
    # two answers are a hedge, not a final answer: the answer section stays empty and the filters drop it
    ("<think>a<think>b</think><answer>1</answer><answer>2</answer>", "<think>ab</think><answer></answer>"),
])
def test_readable_format(raw, want):
    assert readable(raw) == want


def test_few_shot_prompts_put_the_exemplars_first(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    shots = [{"prompt": "1+2=?", "response": "<think>1+2=3</think><answer>3</answer>"},
             {"prompt": "3+4=?", "response": "<think>3+4=7</think><answer>7</answer>"}]
    chat = few_shot_prompt(tok, shots, "5+6=?", DataConfig(template="chat", prefill="<think>"))
    assert chat.index("1+2=3") < chat.index("3+4=7") < chat.index("5+6=?") and chat.endswith("<think>")
    assert chat.count("<|im_start|>assistant") == 3  # two answered turns and the open one
    plain = few_shot_prompt(tok, shots, "5+6=?", DataConfig(template="plain"))
    assert plain.startswith("Problem: 1+2=?\nSolution: <think>1+2=3") and plain.endswith("Problem: 5+6=?\nSolution: ")


def _cfg(tmp_path, data, model, *extra):
    return load_config("configs/tiny/coldstart.yaml", [
        f"model.path={model}", f"data.train={data}", f"coldstart.out={tmp_path / 'cs.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}", "logging.progress=false", *extra])


def test_worked_solutions_are_verified_and_filtered(tmp_path, tiny_model, cold_start):
    """Without a generator the rows' own solutions are the candidates: the noisy ones (a wrong final answer)
    are dropped, an over-long one is dropped, and the stats add up."""
    rows = read_metrics(cold_start / "train.jsonl")[:300]
    rows[5] = {**rows[5], "response": rows[5]["response"].replace("<think>", "<think>" + "1+1=2, " * 60)}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = build_coldstart_data(_cfg(tmp_path, data, tiny_model, "filters.max_response_tokens=100"))["arithmetic"]
    right = [i for i, r in enumerate(rows) if r["response"].endswith(f"<answer>{r['answer']}</answer>")]
    assert 0 < len(right) < len(rows) and 5 in right
    kept = read_metrics(tmp_path / "cs.jsonl")
    assert [r["source"] for r in kept] == [i for i in right if i != 5]
    assert stats == {"prompts": 300, "samples": 300, "kept": len(right) - 1, "wrong answer": 300 - len(right),
                     "over-long": 1}
    assert all(r["verified"] == "rule" and r["response"] == readable(rows[r["source"]]["response"]) for r in kept)


def test_overwrite_keeps_data_made_from_the_same_inputs(tmp_path, tiny_model, cold_start):
    """--overwrite after a failed SFT phase never costs the data phase again: the same inputs give the same rows,
    so they are kept; changed inputs start the data over."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(cold_start / "train.jsonl")[:40]))
    build_coldstart_data(_cfg(tmp_path, data, tiny_model))
    out = tmp_path / "cs.jsonl"
    before = out.stat().st_mtime_ns, out.read_bytes()
    build_coldstart_data(_cfg(tmp_path, data, tiny_model), overwrite=True)
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before  # not rewritten
    build_coldstart_data(_cfg(tmp_path, data, tiny_model, "coldstart.keep_per_prompt=2"), overwrite=True)
    assert out.stat().st_mtime_ns != before[0]
    with pytest.raises(R1Error, match=r"coldstart.out .* holds results made with other inputs \(coldstart.keep_per_"
                                      r"prompt 2 -> 1\)"):
        build_coldstart_data(_cfg(tmp_path, data, tiny_model))  # without --overwrite: refused, saying what changed


def test_a_generator_with_exemplars_and_reflection(tmp_path, cold_start):
    model = cold_start / "sft" / "hf"
    shots = tmp_path / "shots.jsonl"
    rows = read_metrics(cold_start / "train.jsonl")
    shots.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg = _cfg(tmp_path, cold_start / "eval.jsonl", model, f"coldstart.generator={model}",
               f"coldstart.exemplars={shots}", "coldstart.shots=2", "coldstart.reflect=true", "rollout.n=2",
               "rollout.max_new_tokens=40", "data.max_samples=12", "coldstart.prompts_per_batch=4",
               "coldstart.reflect_prompt=' check:'")
    gen = Generator(cfg)
    groups = gen.candidates(read_metrics(cold_start / "eval.jsonl"), [0, 1], seed=3)
    assert [len(g) for g in groups] == [2, 2]
    assert all(" check:" in text and text.index(" check:") < len(text) for g in groups for text, _ in g)
    stats = build_coldstart_data(cfg)["arithmetic"]
    assert stats["prompts"] == 12 and stats["samples"] == 24
    assert stats["kept"] + sum(v for k, v in stats.items() if k not in ("prompts", "samples", "kept")) == 24
    for r in read_metrics(tmp_path / "cs.jsonl"):
        assert r["response"].startswith("<think>") and "check:" in r["response"] and r["sample"] < 2


def test_clear_errors(tmp_path, tiny_model, cold_start):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n")
    with pytest.raises(R1Error, match=r"d.jsonl:1.*'response'"):
        build_coldstart_data(_cfg(tmp_path, data, tiny_model))
    with pytest.raises(R1Error, match="coldstart.exemplars"):
        Generator(_cfg(tmp_path, data, tiny_model, f"coldstart.generator={tiny_model}"))
    proc = run_r1("coldstart", "--config", "configs/tiny/coldstart.yaml", "model.path=/nowhere/model",
                  f"data.train={cold_start / 'train.jsonl'}", f"coldstart.out={tmp_path / 'x.jsonl'}",
                  f"train.output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "/nowhere/model" in proc.stderr
