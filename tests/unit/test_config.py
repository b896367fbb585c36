import re

import pytest

from r1cli.config import load_config
from r1cli.errors import R1Error


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\ngrpo:\n  beta: 0.5\n")
    cfg = load_config(str(p), ["optim.lr=2e-5", "grpo.eps_high=0.28", "rollout.stop=[a, b]",
                               "rewards.weights.language=0.3", "data.template=r1_zero"])
    assert cfg.optim.lr == 2e-5 and cfg.grpo.beta == 0.5 and cfg.grpo.eps_high == 0.28
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 0.1, "language": 0.3}
    assert cfg.data.template == "r1_zero"


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(R1Error, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  betta: 0.1\n")
    with pytest.raises(R1Error, match=r"'grpo.betta'; did you mean 'grpo.beta'"):
        load_config(str(p))


@pytest.mark.parametrize("override, pattern", [
    ("train.steps=ten", r"'train.steps': 'ten' is not int"),
    ("grpo.beta=yes", r"'grpo.beta': True is not float"),
    ("data.template=jinja", r"'data.template': 'jinja' is not one of chat\|r1_zero\|r1_zero_chat\|plain"),
    ("data.pack=3", r"'data.pack': 3 is not bool"),
])
def test_bad_type_names_key_value_and_type(override, pattern):
    with pytest.raises(R1Error, match=pattern):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(R1Error, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        if "stages" in (text := f.read_text()) and "pipeline:" in text:  # a pipeline: every stage's config loads
            from r1cli.pipeline import read_pipeline, stage_configs

            assert stage_configs(read_pipeline(f), [])
        else:
            load_config(str(f))


@pytest.mark.parametrize("override, pattern", [
    ("grpo.advantage=grpoo", r"unknown advantage estimator 'grpoo' in grpo.advantage; did you mean 'grpo'\? "
                             r"\(known: grpo, drgrpo, rloo, reinforce\+\+, reinforce\+\+-baseline, gae\)"),
    ("grpo.loss_agg=mean", r"unknown loss aggregation 'mean' in grpo.loss_agg.*known: seq-mean-token-mean, "
                           r"token-mean, seq-mean-token-sum-norm"),
    ("grpo.kl_estimator=k4", r"unknown KL estimator 'k4' in grpo.kl_estimator.*known: k1, k2, k3"),
    ("grpo.ratio_level=seq", r"unknown ratio level 'seq' in grpo.ratio_level.*known: token, sequence"),
    ("rollout.engine=vllmm", r"unknown rollout engine 'vllmm' in rollout.engine.*known: hf"),
    ("parallel.backend=megatrom", r"unknown trainer backend 'megatrom' in parallel.backend.*known: torch"),
    ("rewards.weights.formt=1", r"unknown reward 'formt' in rewards.weights; did you mean 'format'"),
])
def test_registered_names_are_checked_against_their_one_table(override, pattern):
    with pytest.raises(R1Error, match=pattern):
        load_config(None, [override])


def test_a_registered_extension_becomes_a_valid_config_value():
    from r1cli.rl.advantages import ADVANTAGES

    ADVANTAGES.register("median", lambda r, eps: r - r.median(-1, keepdim=True).values)
    try:
        assert load_config(None, ["grpo.advantage=median"]).grpo.advantage == "median"
    finally:
        ADVANTAGES.unregister("median")


def test_moved_eval_keys_say_where_they_went():
    with pytest.raises(R1Error, match=r"config key 'train.eval_n' moved to 'eval.n'"):
        load_config(None, ["train.eval_n=4"])


@pytest.mark.parametrize("override", ["optim.lr=nan", "rollout.temperature=nan", "rollout.top_p=.nan",
                                      "grpo.beta=inf", "filters.min_language_share=nan", "rewards.weights.format=-inf",
                                      "optim.lr=1e999"])
def test_a_float_option_that_is_not_finite_is_refused(override):
    """NaN compares false with every bound, so it used to pass the range checks (grpo.beta=nan ran to 'final loss
    nan' with exit 0; top_p=nan behaved as 1; min_language_share=nan turned the filter off)."""
    key = override.split("=")[0]
    with pytest.raises(R1Error, match=rf"config key '{re.escape(key)}': .* is not a finite number"):
        load_config(None, [override])
