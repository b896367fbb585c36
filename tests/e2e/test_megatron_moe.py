"""Mixtures of experts through megatron-core: tiny Qwen3-MoE and Mixtral models (`r1 data tiny-model --spec`),
their conversion over TP x PP x EP, megatron-core's MoE layer (router, all-to-all token dispatch over gloo,
SequentialMLP experts) on the converted shards against transformers' own MoE modules, the Megatron trainer at
parallel.expert_parallel=2 against the torch backend, and its checkpoints across EP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_r1, torchrun
from safetensors import safe_open
from test_megatron_trainer import assert_same_steps, step_run

from r1cli.backends.megatron.convert import TensorFolder, hf_to_megatron, megatron_to_hf, rank_dir
from r1cli.run.metrics import read_metrics

MOE_SPECS = {"qwen3_moe": dict(family="qwen3_moe", tie_word_embeddings=False),
             "mixtral": dict(family="mixtral"),
             # DeepSeek-V3 as its config has it, shrunk: a low-rank query, the first layer dense, group-limited
             # routing (2 groups, 1 open to each token), scaled weights, one shared expert, a non-zero expert bias
             # (tiny.py draws one) and YaRN RoPE (set in the fixture)
             "deepseek_v3": dict(family="deepseek_v3", num_hidden_layers=4, tie_word_embeddings=False,
                                 q_lora_rank=16, n_group=2, topk_group=1, routed_scaling_factor=2.5)}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Tiny MoE folders (4 experts, top 2) with random non-zero norms, so that a mixed-up copy cannot pass."""
    from safetensors.torch import save_file

    from r1cli.models.tiny import TinySpec, build_tiny_model

    built = {}

    def get(name):
        if name not in built:
            path = build_tiny_model(tmp_path_factory.mktemp(name) / "hf", TinySpec(**MOE_SPECS[name]))
            files = TensorFolder(path)
            tensors = {n: files.get(n) for n in files.where}
            g = torch.Generator().manual_seed(1)
            for n, t in tensors.items():
                if "norm" in n:
                    tensors[n] = torch.randn(t.shape, generator=g)
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
            if name == "deepseek_v3":
                cfg = json.loads((path / "config.json").read_text())
                (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": YARN}))
            built[name] = path
        return built[name]

    return get


def _all(folder):
    f = TensorFolder(folder)
    return {n: f.get(n) for n in f.where}


@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_moe_round_trip_is_bit_identical_at_tp2_pp2_ep2(moe_models, name, tmp_path):
    model = moe_models(name)
    meg = hf_to_megatron(model, tmp_path / "meg", tp=2, pp=2, ep=2)
    assert sorted(p.name for p in meg.glob("mp_rank_*")) == [rank_dir(t, p, e) for t in range(2) for p in range(2)
                                                            for e in range(2)]
    back = megatron_to_hf(meg, tmp_path / "back")
    a, b = _all(model), _all(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]


def test_each_expert_rank_holds_its_experts_split_over_tp_and_the_whole_router(moe_models, tmp_path):
    """4 experts over EP=2: rank e holds experts 2e, 2e+1 as its local experts 0, 1; each expert's gate and up
    rows are split over TP like the dense MLP's, [gate rows t | up rows t]; the router is whole everywhere."""
    model = moe_models("qwen3_moe")
    hf = _all(model)
    meg = hf_to_megatron(model, tmp_path / "meg", tp=2, pp=1, ep=2)
    pre = "model.layers.1.mlp."
    for t in range(2):
        for e in range(2):
            with safe_open(meg / rank_dir(t, 0, e) / "model.safetensors", "pt") as h:
                names = [n for n in h.keys() if "local_experts" in n and "layers.1." in n]
                assert len(names) == 4  # 2 experts x (fc1, fc2)
                for j in range(2):
                    i = 2 * e + j
                    fc1 = h.get_tensor(f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight")
                    gate, up = hf[pre + f"experts.{i}.gate_proj.weight"], hf[pre + f"experts.{i}.up_proj.weight"]
                    half = gate.shape[0] // 2
                    assert torch.equal(fc1, torch.cat([gate[t * half:(t + 1) * half], up[t * half:(t + 1) * half]]))
                    fc2 = h.get_tensor(f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight")
                    down = hf[pre + f"experts.{i}.down_proj.weight"]
                    assert torch.equal(fc2, down.chunk(2, dim=1)[t])
                assert torch.equal(h.get_tensor("decoder.layers.1.mlp.router.weight"), hf[pre + "gate.weight"])


def test_impossible_expert_layouts_are_one_line(moe_models, tmp_path):
    proc = run_r1("convert", "hf-to-megatron", str(moe_models("qwen3_moe")), str(tmp_path / "x"), "--ep", "3")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "4 experts are not divisible by expert_parallel=3" in lines[0]
    from r1cli.models.tiny import build_tiny_model

    dense = build_tiny_model(tmp_path / "dense")
    proc = run_r1("convert", "hf-to-megatron", str(dense), str(tmp_path / "y"), "--ep", "2")
    assert proc.returncode == 2 and "expert_parallel=2 needs a mixture of experts; qwen2 has none" in proc.stderr
    proc = run_r1("convert", "hf-to-megatron", str(moe_models("mixtral")), str(tmp_path / "z"), "--ep", "2")
    assert proc.returncode == 0 and "wrote 1 x 1 x 2 (TP x PP x EP) megatron shards" in proc.stdout, proc.stderr


def logits(model, tmp_path, tp: int, pp: int, ep: int) -> dict:
    """TP x PP x EP processes: the expert ranks are the data-parallel ones (EP data-parallel replicas)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp * pp * ep}", "--standalone",
           str(ROOT / "tests" / "megatron_logits.py"), str(model), str(tmp_path / "meg"), str(tp), str(pp), str(ep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("name,tp,pp,ep", [  # the default run keeps EP=2; the step tests cover TP=2 and DeepSeek-V3
    ("qwen3_moe", 1, 1, 2),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in
      [("deepseek_v3", 2, 1, 2), ("qwen3_moe", 2, 1, 1), ("mixtral", 1, 1, 2), ("qwen3_moe", 2, 1, 2),
       ("qwen3_moe", 1, 2, 2), ("mixtral", 2, 1, 1), ("deepseek_v3", 1, 1, 2), ("deepseek_v3", 2, 1, 1),
       ("deepseek_v3", 2, 2, 2)])])
def test_megatron_core_moe_logits_equal_transformers(moe_models, name, tp, pp, ep, tmp_path):
    """megatron-core's MoE layer on the converted shards - softmax router with the top-k weights renormalised,
    dropless all-to-all dispatch over gloo when EP > 1, experts split over TP - gives transformers' logits: the
    expert placement, the router and the expert SwiGLU fusion agree with megatron's own layers. DeepSeek-V3:
    megatron's latent attention (its up projections split over TP, the down projections whole, interleaved YaRN
    RoPE with its mscales), its sigmoid router (expert bias for the choice, group-limited top-k, scaled weights),
    the shared expert and the dense first layer."""
    out = logits(moe_models(name), tmp_path, tp, pp, ep)
    assert out["max_diff"] < 1e-5 * max(1.0, out["scale"]), out


@pytest.fixture(scope="module")
def moe_steps(tmp_path_factory):
    """A tiny Qwen3-MoE without the auxiliary loss (the torch backend trains through transformers' MoE modules,
    which add it only to their own causal-LM loss) and the torch backend's SFT + GRPO steps on it."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    d = tmp_path_factory.mktemp("moe-steps")
    model = build_tiny_model(d / "hf", TinySpec(family="qwen3_moe", tie_word_embeddings=False,
                                                router_aux_loss_coef=0.0))
    return model, step_run(model, d / "torch", "torch", 1, 1)


MOE_LAYOUTS = {"ep1": (1, []), "ep2": (1, ["dp2", "parallel.expert_parallel=2"]),
               "tp2-sp": (2, ["parallel.megatron.sequence_parallel=true"])}


@pytest.mark.parametrize("layout", [pytest.param("ep1", marks=pytest.mark.slow), "ep2",
                                    pytest.param("tp2-sp", marks=pytest.mark.slow)])
def test_one_sft_and_one_grpo_step_at_ep2_and_tp2_equal_the_torch_backend(moe_steps, layout, tmp_path):
    """megatron-core's MoE layer against transformers' own: at EP=2 each rank holds two of the four experts and
    its tokens reach the others by all-to-all; at TP=2 (with sequence parallelism, which megatron-core requires for
    MoE training) every expert is split over both ranks; the losses, the
    gradient norm and the weights after both Adam steps (expert by expert, gathered back to HF names) equal the
    torch backend's single process."""
    model, reference = moe_steps
    tp, extra = MOE_LAYOUTS[layout]
    run = step_run(model, tmp_path / layout, "megatron", tp, 1, *extra)
    # log-probs: megatron sums the top-k experts' outputs in another order than transformers (fp32 rounding)
    assert_same_steps(reference, run, logp=layout != "ep2", logp_atol=1e-4)


@pytest.fixture(scope="module")
def deepseek_steps(tmp_path_factory):
    """A tiny DeepSeek-V3 (latent attention with a low-rank query, a dense first layer, group-limited sigmoid
    routing with the expert bias, one shared expert) and the torch backend's SFT + GRPO steps on it."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    d = tmp_path_factory.mktemp("deepseek-steps")
    model = build_tiny_model(d / "hf", TinySpec(**MOE_SPECS["deepseek_v3"]))
    return model, step_run(model, d / "torch", "torch", 1, 1)


@pytest.mark.parametrize("layout", [pytest.param("ep2", marks=pytest.mark.slow), "tp2-sp"])
def test_deepseek_v3_sft_and_grpo_steps_equal_the_torch_backend(deepseek_steps, layout, tmp_path):
    """megatron's latent attention and sigmoid-routed experts train as transformers' DeepSeek-V3 modules do: at
    EP=2 over the all-to-all, at TP=2 with the up projections and the shared expert split over both ranks.
    The expert bias stays as the checkpoint has it (no aux-free update, as transformers trains), so the weights
    after both Adam steps match name by name, the bias among them."""
    model, reference = deepseek_steps
    tp, extra = MOE_LAYOUTS[layout]
    run = step_run(model, tmp_path / layout, "megatron", tp, 1, *extra)
    assert_same_steps(reference, run, logp=layout != "ep2", logp_atol=1e-4)  # EP=2: each rank's half
    assert any(n.endswith("e_score_correction_bias") for n in run[1])


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_the_aux_free_expert_bias_update_moves_each_bias_by_the_rate(deepseek_steps, moe_models, arith_data, tmp_path):
    """parallel.megatron.expert_bias_update_rate: after each of the two steps megatron-core moves every MoE layer's
    expert bias by +-rate (toward the experts that got fewer tokens than the mean, 0 where exactly even); the
    moved bias is what the weights hand out (to the engine, the export) under transformers' name. A model without
    an expert bias refuses the option in one line."""
    model, reference = deepseek_steps
    rate = 0.01
    run = step_run(model, tmp_path / "bias", "megatron", 1, 1, f"parallel.megatron.expert_bias_update_rate={rate}")
    names = [n for n in run[1] if n.endswith("e_score_correction_bias")]
    assert names
    for name in names:
        moved = (run[1][name] - reference[1][name]) / rate
        assert torch.allclose(moved, moved.round(), atol=1e-3) and moved.abs().max() <= 2 + 1e-3, (name, moved)
        assert moved.abs().sum() > 0, name
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={moe_models('qwen3_moe')}",
                  f"data.train={arith_data[0]}", "data.eval=", "parallel.backend=megatron",
                  "parallel.megatron.expert_bias_update_rate=0.01", f"train.output_dir={tmp_path / 'qwen3'}")
    assert proc.returncode == 2 and "qwen3_moe routes without one" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_a_checkpoint_saved_at_ep2_resumes_at_ep1_with_the_same_logprobs(moe_steps, tmp_path):
    """megatron's distributed checkpoint holds each expert once, whichever rank saved it: loaded by one process
    at EP=1 it gives the log-probs the EP=2 run had after its SFT step, and the GRPO step after loading equals
    the one the EP=2 run took; the EP=2 run's Hugging Face export loads in transformers."""
    model, _ = moe_steps
    saved = step_run(model, tmp_path / "save", "megatron", 1, 1, "dp2", "parallel.expert_parallel=2",
                     "--save", str(tmp_path / "ckpt"), "--export", str(tmp_path / "hf"))
    loaded = step_run(model, tmp_path / "load", "megatron", 1, 1, "--load", str(tmp_path / "ckpt"))
    before = torch.tensor(saved[0]["after_sft_logp"])  # rank 0's rows 0, 2, 4, 6
    after = torch.tensor(loaded[0]["after_sft_logp"])[::2, :before.shape[1]]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert_same_steps(saved, loaded, logp=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    exported = _all(tmp_path / "hf")
    assert exported.keys() == saved[1].keys() and all(torch.equal(exported[n], saved[1][n]) for n in exported)
    assert hf.config.model_type == "qwen3_moe"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_tiny_r1_zero_learns_with_a_moe_model_at_ep2(family, tmp_path):
    """The tiny R1-Zero run with a tiny Qwen3-MoE (4 experts, top 2, the auxiliary loss at 0.001) or DeepSeek-V3
    (latent attention, a dense first layer, sigmoid routing with the expert bias, a shared expert): a cold start
    on the torch backend (configs/tiny/sft.yaml), then configs/tiny/zero.yaml on megatron at EP=2 under torchrun
    clears the dense runs' learning bar."""
    from conftest import assert_learns

    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate, split_held_out
    from r1cli.models.tiny import TinySpec, build_tiny_model

    model = build_tiny_model(tmp_path / "moe", TinySpec(family=family))
    train, held = split_held_out(generate("arithmetic", 4200, seed=0, digits=2, ops="+", answer_noise=0.5), 200)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(held, tmp_path / "eval.jsonl")
    data = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
            "logging.progress=false", "logging.tensorboard=false"]
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={model}", *data,
                  f"train.output_dir={tmp_path / 'sft'}", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "rl"
    proc = torchrun(2, "rl", "--config", "configs/tiny/zero.yaml", f"model.path={tmp_path / 'sft' / 'hf'}", *data,
                    "parallel.backend=megatron", "parallel.expert_parallel=2", f"train.output_dir={out}",
                    timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_learns(out)
    moe = [m for m in read_metrics(out / "metrics.jsonl") if "moe/load_imbalance" in m]
    assert len(moe) == 80 and all(m["moe/load_imbalance"] >= 1.0 for m in moe)


DEEPSEEK_REFUSALS = [
    (dict(rope_interleave=False), "megatron-core's latent attention always de-interleaves the rotary dimensions"),
    (dict(norm_topk_prob=False), "megatron-core's sigmoid router always renormalises the top-k weights"),
    (dict(n_group=2, topk_group=1, num_experts_per_tok=3), "megatron-core ranks it by its best top-k / "
                                                           "topk_group = 3"),
    (dict(attention_bias=True), "no biases on its down projections"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "is not supported by the megatron backend")]


def test_what_megatron_cannot_express_of_deepseek_v3_is_refused(moe_models, tmp_path):
    """DeepSeek-V3 variants megatron-core's layers would compute differently are refused, not approximated (the
    torch backend trains them through transformers' own modules); `r1 convert` says so in one line."""
    from r1cli.backends.megatron.model import transformer_config
    from r1cli.errors import R1Error

    cfg = json.loads((moe_models("deepseek_v3") / "config.json").read_text())
    for change, message in DEEPSEEK_REFUSALS:
        with pytest.raises(R1Error, match=message):
            transformer_config({**cfg, **change}, 1, 1)
    model = tmp_path / "variant"
    model.mkdir()
    for f in moe_models("deepseek_v3").iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    (model / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    proc = run_r1("convert", "hf-to-megatron", str(model), str(tmp_path / "x"))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and DEEPSEEK_REFUSALS[1][1] in lines[0], proc.stderr


@pytest.mark.slow
def test_a_deepseek_v3_checkpoint_saved_at_tp2_resumes_at_ep2(deepseek_steps, tmp_path):
    """Latent attention's duplicated down projections, the shared expert's TP shards and the routers' expert
    bias reshard: saved by TP=2 (sequence parallel), loaded by two EP ranks, the log-probs after the SFT step and
    the GRPO step after loading equal the saving run's; its Hugging Face export is that run's weights."""
    model, _ = deepseek_steps
    saved = step_run(model, tmp_path / "save", "megatron", 2, 1, "parallel.megatron.sequence_parallel=true",
                     "--save", str(tmp_path / "ckpt"), "--export", str(tmp_path / "hf"))
    loaded = step_run(model, tmp_path / "load", "megatron", 1, 1, "dp2", "parallel.expert_parallel=2",
                      "--load", str(tmp_path / "ckpt"))
    after = torch.tensor(loaded[0]["after_sft_logp"])  # rank 0's rows 0, 2, 4, 6
    before = torch.tensor(saved[0]["after_sft_logp"])[::2, :after.shape[1]]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert_same_steps(saved, loaded, logp=False)
    exported = _all(tmp_path / "hf")
    assert exported.keys() == saved[1].keys() and all(torch.equal(exported[n], saved[1][n]) for n in exported)


def test_moe_at_tp2_without_sequence_parallelism_is_one_line(moe_steps, arith_data, tmp_path):
    model, _ = moe_steps
    proc = torchrun(2, "sft", "--config", "configs/tiny/sft.yaml", f"model.path={model}",
                    f"data.train={arith_data[0]}", "data.eval=", f"train.output_dir={tmp_path / 'run'}",
                    "parallel.backend=megatron", "parallel.tensor_parallel=2", timeout=300)
    # each rank's one line (torchrun then reports the failed processes itself)
    assert proc.returncode != 0 and ("error: a mixture of experts at tensor_parallel=2 trains with sequence "
                                     "parallelism (megatron-core requires it): set "
                                     "parallel.megatron.sequence_parallel=true") in proc.stderr, proc.stderr[-3000:]
