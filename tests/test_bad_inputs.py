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


@pytest.mark.parametrize("command", ["coldstart", "sample", "distill", "eval"])
def test_commands_not_built_yet_say_so(command):
    one_line_error(run_r1(command, "--model", "x"), f"r1 {command} (")
    assert "not built yet" in run_r1(command).stderr


def test_synth_count_out_of_range(tmp_path):
    proc = run_r1("data", "synth", "countdown", "--out", str(tmp_path / "x.jsonl"), "--count", "0")
    assert proc.returncode == 2 and "'--count': 0 is not in the range 2<=x<=8" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_help_explains_overrides():
    for command in ("sft", "rl"):
        out = run_r1(command, "--help").stdout
        assert "section.key=value" in out and "--print-config" in out
