"""A mixture of experts on the torch backend (transformers' own MoE modules): SFT and GRPO run, the routing
figures reach the metrics, the progress line and `r1 report`, and the rollout engine follows the weights."""

from conftest import run_r1

from r1cli.run.metrics import read_metrics


def test_sft_and_grpo_on_a_tiny_moe_log_the_routing(arith_data, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("family: qwen3_moe\nnum_experts: 4\nnum_experts_per_tok: 2\n")
    proc = run_r1("data", "tiny-model", "--out", str(tmp_path / "moe"), "--spec", str(spec))
    assert proc.returncode == 0, proc.stderr[-2000:]
    common = [f"data.train={arith_data[0]}", "data.eval=", "logging.progress=false", "logging.tensorboard=false"]
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tmp_path / 'moe'}", "train.steps=30",
                  f"train.output_dir={tmp_path / 'sft'}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = [m for m in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in m]
    assert sft[-1]["loss"] < sft[0]["loss"]
    assert all(1.0 <= m["moe/load_imbalance"] <= 4.0 and 0.0 <= m["moe/load_min_share"] <= 1.0
               and 1.0 <= m["moe/balance"] <= 4.0 for m in sft)  # E = 4 bounds both ratios
    # GRPO: the transformers engine keeps its own copy (a different sampling temperature's model), refreshed
    # under the checkpoint's per-expert names every step
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", f"model.path={tmp_path / 'sft' / 'hf'}",
                  "train.steps=2", "grpo.prompts_per_step=4", "rollout.n=4", "rollout.asynchronous=true",
                  "rollout.tis_cap=2", f"train.output_dir={tmp_path / 'rl'}", "grpo.beta=0.05",
                  "grpo.ref_update_every=1", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rl = [m for m in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "loss" in m]
    assert len(rl) == 2 and all("moe/load_imbalance" in m for m in rl)
    # the reference took the policy's fused expert tensors after step 1 (it raised a KeyError on the per-expert
    # checkpoint names once): step 2's KL is zero again
    assert rl[1]["kl"] == 0.0
    proc = run_r1("report", str(tmp_path / "rl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "expert routing (1 = even)" in (tmp_path / "rl" / "report.html").read_text()
