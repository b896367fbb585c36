"""Everyday mistakes give one line naming the key or file and what is wrong, with a non-zero exit."""

import pytest
from conftest import run_r1

from r1cli.config import load_config
from r1cli.errors import R1Error


def one_line_error(proc, needle: str) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-1e-5", "'optim.lr': -1e-05 is out of range (must be >= 0.0)"),
    ("logging.every=0", "'logging.every': 0 is out of range (must be >= 1)"),
    ("train.micro_batch_size=0", "'train.micro_batch_size': 0 is out of range (must be >= 1)"),
    ("grpo.prompts_per_step=0", "'grpo.prompts_per_step': 0 is out of range"),
    ("rollout.max_new_tokens=-5", "'rollout.max_new_tokens': -5 is out of range"),
    ("train.steps=0", "'train.steps': 0 is out of range"),
    ("rollout.top_p=1.5", "'rollout.top_p': 1.5 is out of range (must be <= 1.0)"),
])
def test_values_out_of_range(override, needle):
    with pytest.raises(R1Error) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_out_of_range_through_the_cli_before_any_model_loads():
    one_line_error(run_r1("rl", "--config", "configs/tiny/zero.yaml", "model.path=/does/not/exist", "optim.lr=-1"),
                   "error: config key 'optim.lr': -1.0 is out of range")


def test_adv_eps_zero_with_std_normalisation(tmp_path):
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", "grpo.adv_eps=0", "model.path=/does/not/exist",
                  "data.train=configs/tiny/zero.yaml")  # checked before the data is parsed or a model loads
    one_line_error(proc, "grpo.adv_eps=0 with grpo.advantage=grpo")
    assert load_config("configs/tiny/zero.yaml", ["grpo.adv_eps=0", "grpo.advantage=drgrpo"])  # no division


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\noptim:\n  lr: [1e-5\n")
    with pytest.raises(R1Error, match=r"bad.yaml:5:1: not valid YAML \(expected ',' or ']'"):
        load_config(str(bad))
    bad.write_text("train:\n  steps: 3\n   lr: 1\n")
    with pytest.raises(R1Error, match=r"bad.yaml:3:\d+: not valid YAML"):
        load_config(str(bad))


def test_synth_count_out_of_range(tmp_path):
    proc = run_r1("data", "synth", "countdown", "--out", str(tmp_path / "x.jsonl"), "--count", "0")
    assert proc.returncode == 2 and "'--count': 0 is not in the range 2<=x<=8" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_help_explains_overrides():
    for command in ("sft", "rl"):
        out = run_r1(command, "--help").stdout
        assert "section.key=value" in out and "--print-config" in out


# ------------------------------------------------------------------ data files

def test_non_utf8_line_names_file_and_line(tmp_path):
    from r1cli.data.records import read_records

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(R1Error, match=r"latin1.jsonl:2: not UTF-8 \(byte 16 of the line\)"):
        read_records(str(bad))


def test_an_enormous_line_is_an_error_not_a_memory_blowup(tmp_path):
    import json
    import tracemalloc

    from r1cli.data.records import read_records

    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        f.write(json.dumps({"prompt": "small"}) + "\n")
        f.write('{"prompt": "' + "x" * (8 << 20) + '"}\n')  # 8 MiB on one line
    tracemalloc.start()
    with pytest.raises(R1Error, match=r"big.jsonl:2: line longer than 1 MiB \(raise data.max_line_mb"):
        read_records(str(big), max_line_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20  # never read the whole line


def test_rl_row_without_its_answer_is_an_error(tmp_path, tiny_model):
    rows = tmp_path / "rl.jsonl"
    rows.write_text('{"prompt": "1+1", "answer": "2"}\n\n{"prompt": "2+2", "solution": "4"}\n')
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={tiny_model}", f"data.train={rows}",
                  "data.eval=", f"train.output_dir={tmp_path / 'run'}")
    one_line_error(proc, "rl.jsonl:3: row has no field 'answer' (it has: prompt, solution); map the right column "
                         "with data.answer_field")


@pytest.mark.parametrize("row, needle", [
    ('{"prompt": "p", "answer": "2", "task": "algebra"}', "rl.jsonl:2: task 'algebra' has no checker (known: "),
    ('{"prompt": "p", "answer": "7", "task": "countdown"}', "rl.jsonl:2: not a countdown row: numbers must be a list "
                                                            "of integers, got null"),
    ('{"prompt": "p", "answer": ["2", "3"], "task": "math"}', "rl.jsonl:2: not a math row: answer must be text or a "
                                                              "number"),
])
def test_rows_a_checker_cannot_read_are_errors_not_wrong_answers(tmp_path, row, needle):
    """Each would score every sample 0 as a "wrong answer", silently; checked before any model loads."""
    rows = tmp_path / "rl.jsonl"
    rows.write_text('{"prompt": "1+1", "answer": "2", "task": "arithmetic"}\n' + row + "\n")
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", "model.path=/does/not/exist", f"data.train={rows}",
                  "data.eval=", f"train.output_dir={tmp_path / 'run'}")
    one_line_error(proc, needle)


def test_a_generate_call_that_cannot_fit_is_refused_with_its_size():
    from types import SimpleNamespace

    import torch

    from r1cli.run.memory_plan import check_generation_fits

    c = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, num_hidden_layers=2)
    check_generation_fits(c, 8, 4, 128, 4, torch.device("cpu"))  # 2 MiB
    with pytest.raises(R1Error, match=r"8 prompts x 100000000 samples of up to 128 tokens at once needs 4.88e\+04 GB "
                                      r"for the KV cache alone, and .* GB is free on cpu: lower .*rollout.n"):
        check_generation_fits(c, 8, 100_000_000, 128, 4, torch.device("cpu"))


def test_long_prompts_are_dropped_with_a_count_or_an_error(tmp_path, tiny_model):
    import json

    from r1cli.rl.loop import run_rl

    rows = tmp_path / "rl.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "answer": "2", "task": "arithmetic"}) + "\n"
                            for p in ["1+1", "1+1 " * 200, "1+1", "2+0"]))
    base = ["rollout.n=2", "grpo.prompts_per_step=2", "train.steps=1", "data.eval=", "data.max_prompt_tokens=100",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false"]
    cfg = load_config("configs/tiny/zero.yaml", [f"model.path={tiny_model}", f"data.train={rows}",
                                                 f"train.output_dir={tmp_path / 'drop'}", *base])
    import io
    from contextlib import redirect_stderr

    from r1cli.run.console import console

    with redirect_stderr(io.StringIO()):
        with console.capture() as cap:
            run_rl(cfg)
    assert "dropped 1 of 4 prompts longer than 100 tokens" in cap.get()
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={tiny_model}", f"data.train={rows}",
                  f"train.output_dir={tmp_path / 'err'}", "data.long_prompts=error", *base)
    one_line_error(proc, "rl.jsonl:2: the prompt has")


# ------------------------------------------------------------------ model folders

@pytest.fixture
def model_copy(tiny_model, tmp_path):
    import shutil

    return shutil.copytree(tiny_model, tmp_path / "model")


def _sft(model, arith_data, tmp_path):
    return run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={model}", f"data.train={arith_data[0]}",
                  f"train.output_dir={tmp_path / 'run'}")


def test_truncated_safetensors(model_copy, arith_data, tmp_path):
    w = model_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    one_line_error(_sft(model_copy, arith_data, tmp_path), "model.safetensors: truncated or corrupt safetensors")


def test_garbage_safetensors(model_copy, arith_data, tmp_path):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(_sft(model_copy, arith_data, tmp_path), "model.safetensors: not a valid safetensors file")


def test_invalid_config_json(model_copy, arith_data, tmp_path):
    (model_copy / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }\n')
    one_line_error(_sft(model_copy, arith_data, tmp_path), "config.json:2:17: not valid JSON")


def test_model_folder_without_tokenizer(model_copy, arith_data, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / f).unlink()
    one_line_error(_sft(model_copy, arith_data, tmp_path), "has no tokenizer files")


def test_memory_torch_holds_cached_but_unused_counts_as_free_on_a_gpu(monkeypatch):
    """After a training step torch's caching allocator keeps the freed activations reserved: the driver reports
    them taken, yet the next generate reuses them - counted free, so that no call is refused for them (the
    CUDA calls stand in here: 1 GB free to the driver, 6 GB reserved of which 2 GB in use)."""
    import torch

    from r1cli.run.memory_plan import available_bytes

    gb = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gb)
    assert available_bytes(torch.device("cuda", 0)) == 5 * gb
