"""LoRA (model.lora) on the torch backend: the tiny R1-Zero run learns through adapters alone, lr=0 does not; the
reference is the base with the adapters off (no copy); checkpoints hold the adapters and resume exactly; the merged
export and the PEFT folder give the adapted model; two FSDP ranks match one; sft and distill take it too; bad
settings are one line."""

import pytest
import torch
from conftest import run_r1, torchrun
from safetensors.torch import load_file

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.interfaces import build_trainer
from r1cli.rl.loop import run_rl
from r1cli.run.metrics import read_metrics
from r1cli.token_batch import TokenBatch

LORA = ["model.lora.rank=8", "model.lora.alpha=16", "optim.lr=3e-3"]


def rl_config(cold_start, out, *extra):
    return load_config("configs/tiny/zero.yaml", [
        f"model.path={cold_start / 'sft' / 'hf'}", f"data.train={cold_start / 'train.jsonl'}",
        f"data.eval={cold_start / 'eval.jsonl'}", f"train.output_dir={out}", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_every=0", *LORA, *extra])


def eval_curve(run_dir):
    return [m["eval/accuracy"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in m]


def _curve(run_dir, key):
    return [(m["step"], m[key]) for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


@pytest.fixture(scope="module")
def lora_run(cold_start, tmp_path_factory):
    """30 GRPO steps with rank-8 adapters and a KL to the base (beta 0.02), exported to hf/ and hf-adapter/ (20 steps
    gained only +0.15 on an AMD EPYC with transformers 5.25; 30 gained +0.25, +0.30, +0.36 at train.seed 0, 1, 2)."""
    out = tmp_path_factory.mktemp("lora") / "rl"
    run_rl(rl_config(cold_start, out, "train.steps=30", "grpo.beta=0.02"))
    return out


def test_lora_rl_learns_and_lr_zero_does_not(cold_start, lora_run, tmp_path):
    before, after = eval_curve(lora_run)
    assert after - before >= 0.20, (before, after)
    assert all(m["kl"] > 0 for m in read_metrics(lora_run / "metrics.jsonl")[-5:] if "kl" in m)  # it moved off base
    run_rl(rl_config(cold_start, tmp_path / "lr0", "optim.lr=0.0", "train.steps=8", "grpo.beta=0.02"))
    before0, after0 = eval_curve(tmp_path / "lr0")
    assert before0 == before  # the adapters start at zero: the same model, the same seeds
    assert abs(after0 - before0) < 0.05, (before0, after0)


def test_checkpoints_hold_the_adapters_and_the_exports_give_the_adapted_model(cold_start, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = cold_start / "sft" / "hf"
    (step,) = sorted((lora_run / "checkpoints").glob("step_*"))
    assert sorted(p.name for p in step.iterdir()) == ["adapter.safetensors", "manifest.json", "rng_rank0.pt",
                                                       "trainer.pt"]  # no model, no reference
    adapters = load_file(str(step / "adapter.safetensors"))
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    state = torch.load(step / "trainer.pt", weights_only=False)["optimizer"]["state"]
    assert {k.removeprefix("model.") for k in state} == set(adapters)  # AdamW state of the adapters only

    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapted = PeftModel.from_pretrained(base, lora_run / "hf-adapter")  # the PEFT folder, read by peft itself
    reference = adapted.merge_and_unload()  # peft's own merge: an independent path to the merged weights
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "hf")
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    # the merged folder's log-probs are the adapter model's (in float64, so only the merge's rounding remains)
    base = AutoModelForCausalLM.from_pretrained(base_path).double()
    adapted = PeftModel.from_pretrained(base, lora_run / "hf-adapter").double()
    ids = torch.randint(0, merged.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = torch.log_softmax(adapted(ids).logits, -1)
        b = torch.log_softmax(merged.double()(ids).logits, -1)
    assert (a - b).abs().max() < 1e-5


def test_the_reference_is_the_base_with_the_adapters_off(cold_start, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = rl_config(cold_start, tmp_path / "r", "grpo.beta=0.04", "train.device=cpu")
    trainer = build_trainer(cfg, need_reference=True)
    assert trainer.reference is None and trainer.reference_module is None  # no second copy
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)  # adapters that change the model
    batch = TokenBatch.from_completions([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]])
    policy, ref = trainer.logprobs(batch), trainer.logprobs(batch, "reference")
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".lora_" in n)  # switched back on

    def logprobs_of(model):
        out = torch.zeros_like(policy)
        for i, (prompt, completion) in enumerate([([5, 6, 7], [10, 11, 12, 13]), ([8, 9], [14, 15])]):
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].double(), -1)
            out[i, :len(completion)] = logp.gather(1, torch.tensor(completion)[:, None])[:, 0].float()
        return out

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    torch.testing.assert_close(ref, logprobs_of(base), rtol=0, atol=1e-5)
    assert (policy - ref).abs().max() > 0.01
    base.load_state_dict(dict(trainer.named_weights()))  # the merged weights an engine receives
    torch.testing.assert_close(policy, logprobs_of(base), rtol=0, atol=1e-5)


SHORT = ["train.steps=6", "data.eval=", "grpo.prompts_per_step=4", "rollout.n=4", "checkpoint.export_hf=false",
         "grpo.beta=0.05"]


def test_lora_resume_is_exact(cold_start, tmp_path):
    run_rl(rl_config(cold_start, tmp_path / "full", *SHORT))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT, "checkpoint.stop_after=3"))
    run_rl(rl_config(cold_start, tmp_path / "cut", *SHORT), resume=True)
    for key in ("loss", "reward/total", "kl", "grad_norm"):
        full, cut = _curve(tmp_path / "full", key), _curve(tmp_path / "cut", key)
        assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 7))
        assert [v for _, v in cut] == [v for _, v in full], key  # bit-exact on CPU


# FSDP: adapters on the meta-device build, the base frozen in its shards, the engine's own copy fed merged weights
@pytest.mark.slow  # opt-in since the default run passed 15 minutes
@pytest.mark.parametrize("dp", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_ranks_match_one(cold_start, tmp_path, dp):
    base = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "train.steps=3", "grpo.prompts_per_step=4",
            "rollout.n=4", "rollout.prompts_per_generate=1", "logging.progress=false", "logging.tensorboard=false",
            "logging.sample_every=0", "train.micro_batch_size=4", f"parallel.torch.data_parallel={dp}",
            "grpo.beta=0.05", *LORA]
    one = torchrun(1, *base, f"train.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *base, f"train.output_dir={tmp_path / 'two'}", "checkpoint.stop_after=2",
                   "checkpoint.export_hf=false")
    assert two.returncode == 0, two.stderr[-3000:]
    two = torchrun(2, *base, f"train.output_dir={tmp_path / 'two'}", "--resume")
    assert two.returncode == 0, two.stderr[-3000:]
    for key in ("reward/total", "loss", "grad_norm", "kl"):
        a, b = _curve(tmp_path / "one", key), _curve(tmp_path / "two", key)
        assert len(a) == len(b) == 3
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-4, atol=1e-5)
    for run in ("one", "two"):  # the gathered exports agree
        a = load_file(str(tmp_path / "one" / "hf-adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / run / "hf-adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


COMMON = ["--config", "configs/tiny/sft.yaml", "data.eval=", "logging.every=1", "logging.progress=false",
          "logging.tensorboard=false", "optim.warmup_steps=0", "model.lora.rank=16", "model.lora.alpha=32",
          "optim.lr=1e-2", "train.steps=30"]


def test_sft_trains_adapters(tiny_model, cold_start, tmp_path):
    """r1 sft (what r1 coldstart and pipeline stages run) with adapters: the loss falls, only the adapters are
    checkpointed, the export is a whole model and a PEFT folder."""
    common = COMMON
    sft = run_r1("sft", *common, f"model.path={tiny_model}", f"data.train={cold_start / 'train.jsonl'}",
                 f"train.output_dir={tmp_path / 'sft'}", env={"OMP_NUM_THREADS": "1"})
    assert sft.returncode == 0, sft.stderr[-2000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses  # a random tiny model: rank-16 adapters move it slowly
    assert (tmp_path / "sft" / "checkpoints" / "step_00000030" / "adapter.safetensors").is_file()
    assert (tmp_path / "sft" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "sft" / "hf-adapter" / "adapter_config.json").is_file()


@pytest.mark.slow  # the student's adapters on the trainer the sft test runs, with the teacher beside it
def test_distill_trains_adapters(tiny_model, cold_start, tmp_path):
    common = COMMON
    distill = run_r1("distill", "--student", str(tiny_model), "--data", str(cold_start / "train.jsonl"),
                     "--teacher", str(cold_start / "sft" / "hf"), *common, "checkpoint.export_hf=false",
                     f"train.output_dir={tmp_path / 'distill'}", env={"OMP_NUM_THREADS": "1"})
    assert distill.returncode == 0, distill.stderr[-2000:]
    kl = [m["kl"] for m in read_metrics(tmp_path / "distill" / "metrics.jsonl") if "kl" in m]
    assert kl[-1] < kl[0] - 0.3, kl


@pytest.mark.parametrize("setting, message", [
    (["parallel.backend=megatron"], "parallel.backend=megatron does not take it"),
    (["grpo.ref_update_every=10"], "grpo.ref_update_every must be 0"),
    (["model.lora.target_modules=[q_proj,lm_head]"], "lm_head cannot take adapters"),
])
def test_settings_lora_cannot_take_are_refused_as_the_config_loads(cold_start, tmp_path, setting, message):
    with pytest.raises(R1Error, match=message):
        rl_config(cold_start, tmp_path / "r", *setting)


def test_adapters_on_modules_the_model_lacks_are_one_line(cold_start, tmp_path):
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={cold_start / 'train.jsonl'}", f"train.output_dir={tmp_path / 'r'}",
                  "model.lora.rank=4", "model.lora.target_modules=[attn_proj]")
    assert proc.returncode == 2 and "model.lora: Target modules" in proc.stderr and proc.stderr.count("\n") == 1, \
        proc.stderr


def test_a_resume_with_other_adapters_is_refused(cold_start, tmp_path):
    run_rl(rl_config(cold_start, tmp_path / "r", *SHORT, "train.steps=1"))
    with pytest.raises(R1Error, match="model.lora.rank 8 -> 4"):
        run_rl(rl_config(cold_start, tmp_path / "r", *SHORT, "train.steps=2", "model.lora.rank=4"), resume=True)


def test_commands_that_only_generate_refuse_adapters(cold_start, tmp_path):
    from r1cli.eval.run import EvalRequest

    proc = run_r1("sample", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
                  f"data.train={cold_start / 'train.jsonl'}", f"sample.out={tmp_path / 'kept.jsonl'}",
                  "model.lora.rank=4")
    assert proc.returncode == 2 and "r1 sample generates from model.path as it is" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    with pytest.raises(R1Error, match="r1 eval generates from model.path as it is"):
        EvalRequest.from_config(load_config(None, ["model.lora.rank=4"]))
