"""parallel.backend=megatron: one SFT step and one GRPO step at TP=2 (with sequence parallelism) and PP=2 equal the
torch backend's; a checkpoint saved at TP=2 resumes at TP=1; bad layouts are one line; the tiny R1-Zero run learns
at TP=2 (slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_learns, build_family_model, run_r1, torchrun
from safetensors.torch import load_file

from r1cli.run.metrics import read_metrics


def step_run(model, out, backend, tp, pp, *extra):
    """tests/megatron_step.py under torchrun (TP x PP processes): its record and the updated weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    n = tp * pp * (2 if "dp2" in extra else 1)
    extra = [e for e in extra if e != "dp2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone",
           str(ROOT / "tests" / "megatron_step.py"), str(model), str(out), backend, str(tp), str(pp), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "record.json").read_text()), load_file(out / "weights.safetensors")


def assert_same_steps(a, b, logp=True, logp_atol=2e-5):
    (ra, wa), (rb, wb) = a, b
    if logp:
        for key in ("sft_logp", "grpo_old_logp"):
            torch.testing.assert_close(torch.tensor(rb[key]), torch.tensor(ra[key]), rtol=0, atol=logp_atol)
    for step in ("sft", "grpo"):
        if step not in rb:
            continue
        for key, value in ra[step].items():
            if key.startswith("moe/"):  # routing figures count the padding positions, which the backends pad apart
                continue
            if key.startswith("train/"):  # a backend's own bookkeeping (the torch backend's out-of-memory splits)
                continue
            assert rb[step][key] == pytest.approx(value, rel=2e-5, abs=1e-7), (step, key)
    assert wa.keys() == wb.keys()
    for name in wa:  # two Adam steps at lr 0.01: a lost gradient piece moves a weight by ~0.01, noise by < 1e-4
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-3, msg=name)


@pytest.fixture(scope="module", params=["qwen2-bias-tied"])
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = build_family_model(d / "hf", request.param)
    return model, step_run(model, d / "torch", "torch", 1, 1)


# pp2-packed: each micro-batch one packed row of at most 40 tokens (the rows hold 6..27 tokens), against the torch
# backend's padded micro-batches
LAYOUTS = {"tp1": (1, 1), "pp2-packed": (1, 2, "train.max_tokens_per_micro_batch=40"),
           "tp2-sp-recompute": (2, 1, "parallel.megatron.sequence_parallel=true", "model.gradient_checkpointing=true"),
           "tp1-selective-recompute": (1, 1, "model.gradient_checkpointing=true",
                                       "parallel.megatron.recompute=selective")}


@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k in ("tp1", "tp1-selective-recompute")
                                    else k for k in LAYOUTS])  # (selective: its layout's unit test stays)
def test_one_sft_and_one_grpo_step_equal_the_torch_backend(family, layout, tmp_path):
    """Tied embeddings and QKV biases: at PP=2 the output layer's copy of the embedding lives on the other stage
    and their gradients must be summed; at TP=2 the vocabulary, the heads and (SP) the sequence are split, and
    every layer is recomputed in the backward. Half the GRPO rows hold a tool's output (unscored context)."""
    model, torch_run = family
    tp, pp, *extra = LAYOUTS[layout]
    run = step_run(model, tmp_path / layout, "megatron", tp, pp, *extra)
    assert run[0]["grpo"]["clip_frac"] > 0.1  # the clipped branch of the objective is exercised
    assert_same_steps(torch_run, run)


def test_packed_fsdp_ranks_with_unequal_packs_step_like_one_padded_process(family, tmp_path):
    """Two FSDP ranks whose rows pack into 2 and 3 micro-batches of at most 30 tokens: the first halves one of its
    packs (every forward gathers the shards, so both run three), and the step equals one process's padded one."""
    model, torch_run = family
    run = step_run(model, tmp_path / "fsdp", "torch", 1, 1, "dp2", "parallel.torch.data_parallel=fsdp",
                   "train.max_tokens_per_micro_batch=30")
    assert_same_steps(torch_run, run, logp=False)  # rank 0 logs only its own rows under DP=2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-untied", "qwen3-qknorm-untied"])
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2-pp2", "dp2", "tp2-recompute", "tp2-sp-packed"])
def test_every_family_and_layout_steps_like_the_torch_backend(name, layout, tmp_path):
    model = build_family_model(tmp_path / "hf", name)
    tp, pp, extra = {"tp2": (2, 1, []), "pp2": (1, 2, []), "tp2-pp2": (2, 2, []), "dp2": (1, 1, ["dp2"]),
                     "tp2-recompute": (2, 1, ["model.gradient_checkpointing=true"]),
                     "tp2-sp-packed": (2, 1, ["parallel.megatron.sequence_parallel=true",
                                              "train.max_tokens_per_micro_batch=40"])}[layout]
    reference = step_run(model, tmp_path / "torch", "torch", 1, 1)
    run = step_run(model, tmp_path / "meg", "megatron", tp, pp, *extra)
    assert_same_steps(reference, run, logp=layout != "dp2")  # rank 0 logs only its own rows under DP=2


@pytest.mark.slow  # opt-in beside the TP=2 resume run: the default run has the layouts' step parity
def test_a_checkpoint_saved_at_tp2_resumes_at_tp1(family, tmp_path):
    """megatron's distributed checkpoint, weights and Adam state, resharded on load: the GRPO step after loading
    at TP=1 equals the one the TP=2 run took after saving."""
    model, _ = family
    saved = step_run(model, tmp_path / "save", "megatron", 2, 1, "--save", str(tmp_path / "ckpt"),
                     "--export", str(tmp_path / "hf"))
    # the TP=2 run's Hugging Face export holds the weights it trained, and transformers loads it
    from transformers import AutoModelForCausalLM

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == saved[1].keys() and all(torch.equal(exported[n], saved[1][n]) for n in exported)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(hf.get_input_embeddings().weight, saved[1]["model.embed_tokens.weight"])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    loaded = step_run(model, tmp_path / "load", "megatron", 1, 1, "--load", str(tmp_path / "ckpt"))
    torch.testing.assert_close(torch.tensor(loaded[0]["after_sft_logp"]), torch.tensor(saved[0]["after_sft_logp"]),
                               rtol=0, atol=2e-5)
    assert_same_steps(saved, loaded, logp=False)


@pytest.mark.parametrize("extra,message", [
    (["parallel.tensor_parallel=3"], "4 attention heads are not divisible by tensor_parallel=3"),
    (["parallel.pipeline_parallel=2"], "1 processes are not divisible by tensor_parallel x pipeline_parallel = 2"),
    (["parallel.megatron.sequence_parallel=true"],
     "parallel.megatron.sequence_parallel needs parallel.tensor_parallel > 1"),
])
def test_a_bad_layout_is_one_line(tiny_model, arith_data, tmp_path, extra, message):
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}",
                  f"data.train={arith_data[0]}", f"train.output_dir={tmp_path / 'run'}", "parallel.backend=megatron",
                  *extra)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "Warning" not in ln]
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error:")


@pytest.mark.parametrize("backend,fake_te,message", [
    ("megatron", False, "transformer-engine is not installed; install it with: pip install 'r1[te]'"),
    ("megatron", True, "model.precision=fp8 needs a GPU with FP8 tensor cores (Hopper class, compute capability 8.9 "
                       "or newer); no CUDA device is visible"),
    ("torch", False, "model.precision=fp8 needs parallel.backend=megatron"),
])
def test_fp8_without_transformer_engine_or_a_hopper_gpu_is_one_line(tiny_model, arith_data, tmp_path, backend,
                                                                     fake_te, message):
    env = {}
    if fake_te:  # an importable transformer_engine, so that the GPU check is the one that speaks
        (tmp_path / "te" / "transformer_engine").mkdir(parents=True)
        (tmp_path / "te" / "transformer_engine" / "__init__.py").write_text("")
        env["PYTHONPATH"] = str(tmp_path / "te")
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}",
                  f"data.train={arith_data[0]}", f"train.output_dir={tmp_path / 'run'}", f"parallel.backend={backend}",
                  "model.precision=fp8", env=env)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_te_names_are_megatron_core_own_map_of_the_local_spec():
    """The Transformer Engine spec fuses a norm into the next linear layer where that is a plain one;
    megatron-core's local spec carries the map to those names for its (dense) checkpoints, and families.te_name must
    agree with it. A norm the TE model keeps as its own (before experts, before latent attention) keeps its name."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from r1cli.backends.megatron.families import MEGATRON, te_name

    keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    dense = ("qkv", "proj", "q_norm", "k_norm", "fc1", "fc2", "attn_norm", "mlp_norm")
    names = [f"decoder.layers.3.{MEGATRON[k]}" for k in dense] + [MEGATRON[k] for k in ("embed", "final_norm",
                                                                                          "output")]
    expected = []
    for name in names:
        for local, te in keys_map.items():
            name = name.replace("." + local, "." + te)
        expected.append(name)
    for name, te in zip(names, expected):
        assert te_name(name, set(expected)) == te, name
    assert te_name("decoder.layers.0.input_layernorm.weight", set()) == \
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    moe_norm = "decoder.layers.1.pre_mlp_layernorm.weight"  # a TENorm of its own before the experts
    assert te_name(moe_norm, {moe_norm, "decoder.layers.1.input_layernorm.weight"}) == moe_norm
    assert te_name("decoder.layers.0.self_attention.kv_layernorm.weight", set()) == \
        "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight"


@pytest.mark.slow
def test_tiny_r1_zero_learns_at_tp2(cold_start, tmp_path):
    """The tiny R1-Zero run (configs/tiny/zero.yaml) with parallel.backend=megatron under torchrun at TP=2 clears
    the torch backend's learning bar, and resumes from its checkpoint."""
    out = tmp_path / "run"
    proc = torchrun(2, "rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                    f"data.train={cold_start / 'train.jsonl'}", f"data.eval={cold_start / 'eval.jsonl'}",
                    "parallel.backend=megatron", "parallel.tensor_parallel=2", f"train.output_dir={out}",
                    "logging.progress=false", "logging.tensorboard=false", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_learns(out)
    assert (out / "hf" / "model.safetensors").is_file()



@pytest.mark.slow
def test_a_tp2_run_stopped_between_checkpoints_resumes_exactly(cold_start, tmp_path):
    """Stopped after step 3 of 6 (checkpoint.stop_after), `--resume` continues from the distributed checkpoint and
    logs the uninterrupted run's numbers at every step: weights, Adam state, reference and RNG all come back."""
    base = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "train.steps=6", "grpo.prompts_per_step=4",
            "rollout.n=4", "grpo.beta=0.05", "checkpoint.export_hf=false", "logging.progress=false",
            "logging.tensorboard=false", "logging.sample_every=0", "parallel.backend=megatron",
            "parallel.tensor_parallel=2"]
    runs = [(tmp_path / "full", []), (tmp_path / "cut", ["checkpoint.stop_after=3"]), (tmp_path / "cut", ["--resume"])]
    for out, extra in runs:
        proc = torchrun(2, *base, f"train.output_dir={out}", *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for key in ("loss", "reward/total", "kl", "grad_norm"):
        full = [(m["step"], m[key]) for m in read_metrics(tmp_path / "full" / "metrics.jsonl") if key in m]
        cut = [(m["step"], m[key]) for m in read_metrics(tmp_path / "cut" / "metrics.jsonl") if key in m]
        assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 7))
        assert [v for _, v in cut] == pytest.approx([v for _, v in full], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("longest,tp,sp,fp8,mbs", [(37, 1, False, True, 1), (37, 2, True, True, 3),
                                                   (100, 4, True, True, 5), (37, 2, True, False, 1),
                                                   (37, 2, False, False, 1)])
def test_rows_are_padded_as_transformer_engine_fp8_asks(longest, tp, sp, fp8, mbs):
    """TE's FP8 GEMMs assert a token count divisible by 16 on each rank (rows padded only to a multiple of TP
    failed it); sequence parallelism splits each row over the TP ranks."""
    from r1cli.backends.megatron.trainer import FP8_TOKEN_MULTIPLE, row_width

    w = row_width(longest, tp, sp, fp8)
    per_rank_tokens = mbs * w // (tp if sp else 1)
    assert w >= longest and w < longest + (tp if sp else 1) * (FP8_TOKEN_MULTIPLE if fp8 else 1)
    assert (w % tp == 0) if sp else True
    assert per_rank_tokens % FP8_TOKEN_MULTIPLE == 0 if fp8 else w == (-(-longest // tp) * tp if sp else longest)


def test_packed_rows_reach_transformer_engine_as_thd_sequences_by_its_rules():
    """Under the TE layers packed rows are one THD sequence per micro-batch (TE's causal attention ignores a mask):
    cu_seqlens must be int32, start at 0, rise strictly and end at the token count - and the segments must be
    exactly the per-sample blocks the local layers' mask allows (so both see the same attention)."""
    from r1cli.backends.megatron.trainer import sample_mask, thd_params

    # two rows of width 12: samples of 5, 4 and 3 tokens, then 7 tokens and 5 of padding (positions counting on)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    pos[1, 7:] = torch.arange(5)  # the padding as the trainer lays it: a segment of its own
    thd = thd_params(pos)
    cu = thd["cu_seqlens_q"]
    assert thd["qkv_format"] == "thd" and cu.dtype == torch.int32 and thd["cu_seqlens_kv"] is cu
    assert cu.tolist() == [0, 5, 9, 12, 19, 24] and thd["max_seqlen_q"] == thd["max_seqlen_kv"] == 7
    assert bool((cu[1:] > cu[:-1]).all()) and cu[0] == 0 and cu[-1] == pos.numel()
    segment = torch.bucketize(torch.arange(pos.numel()), cu[1:], right=True).view(2, 12)
    allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(allowed, ~sample_mask(pos)[:, 0])


def test_the_layers_a_megatron_run_builds(monkeypatch):
    """parallel.megatron.layers: TE's layers (flash attention) on a GPU wherever transformer_engine imports, the
    local ones on the CPU; FP8 needs TE; asking for what is missing names the extra."""
    import sys
    import types

    from r1cli.backends.megatron.model import use_te_layers
    from r1cli.errors import R1Error

    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not installed
    assert use_te_layers("auto", fp8=False, on_gpu=False) is False
    assert use_te_layers("auto", fp8=False, on_gpu=True) is False  # with a note on stderr
    with pytest.raises(R1Error, match="pip install 'r1\\[te\\]'"):
        use_te_layers("te", fp8=False, on_gpu=True)
    with pytest.raises(R1Error, match="fp8 needs the Transformer Engine layers"):
        use_te_layers("local", fp8=True, on_gpu=True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert use_te_layers("auto", fp8=False, on_gpu=True) is True
    assert use_te_layers("auto", fp8=False, on_gpu=False) is False
    assert use_te_layers("local", fp8=False, on_gpu=True) is False


def test_a_tp2_rl_step_generates_once_per_replica(cold_start, tmp_path):
    """`r1 rl` at TP=2 on megatron: the replica's first rank generates, both TP ranks train on those samples (its
    model-parallel group carries them), and every collective r1 calls reads a tensor placed for the group."""
    out = tmp_path / "run"
    proc = torchrun(2, "rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                    f"data.train={cold_start / 'train.jsonl'}", f"data.eval={cold_start / 'eval.jsonl'}",
                    "eval.samples=8", "train.steps=2", "grpo.prompts_per_step=4", "rollout.n=4",
                    "parallel.backend=megatron", "parallel.tensor_parallel=2", f"train.output_dir={out}",
                    "checkpoint.export_hf=false", "logging.progress=false", "logging.tensorboard=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["response_len/mean"] > 0 for m in steps)
