"""The tiny R1 demo learns for every seed, not only the one the other tests use (opt-in: -m slow, ~10 min for
each of padded and packed RL micro-batches).

For seeds 0-4 the model, the data, the cold start and the RL all take the seed; each run must gain at least
20 points of held-out accuracy at the configs' default step counts (configs/tiny/sft.yaml, zero.yaml)."""

import pytest

from r1cli.config import load_config
from r1cli.data.records import write_jsonl
from r1cli.data.synth import generate, split_held_out
from r1cli.models.tiny import TinySpec, build_tiny_model
from r1cli.rl.loop import run_rl
from r1cli.run.metrics import read_metrics
from r1cli.sft.loop import run_sft


@pytest.mark.slow
@pytest.mark.parametrize("rl_batches", ["padded", "packed"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_the_tiny_demo_learns_for_every_seed(tmp_path, seed, rl_batches):
    """packed: the RL micro-batches are packed rows of at most 2048 tokens (train.max_tokens_per_micro_batch)."""
    model = build_tiny_model(tmp_path / "model", TinySpec(seed=seed))
    train, held = split_held_out(generate("arithmetic", 4200, seed=seed, digits=2, ops="+", answer_noise=0.5), 200)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(held, tmp_path / "eval.jsonl")
    common = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}", f"train.seed={seed}",
              "logging.progress=false", "logging.tensorboard=false"]
    run_sft(load_config("configs/tiny/sft.yaml", [f"model.path={model}", f"train.output_dir={tmp_path / 'sft'}",
                                                  *common]))
    packing = ["train.max_tokens_per_micro_batch=2048"] if rl_batches == "packed" else []
    run_rl(load_config("configs/tiny/zero.yaml", [f"model.path={tmp_path / 'sft' / 'hf'}",
                                                  f"train.output_dir={tmp_path / 'rl'}", *common, *packing]))
    acc = [m["eval/accuracy"] for m in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "eval/accuracy" in m]
    assert acc[-1] - acc[0] >= 0.20, f"seed {seed}: held-out {acc[0]:.3f} -> {acc[-1]:.3f}"
