"""r1 sft end to end on the tiny model: it learns, resumes exactly, and runs data-parallel."""

import json

import pytest
import torch
from conftest import run_r1, torchrun

from r1cli.config import load_config
from r1cli.run.metrics import read_metrics
from r1cli.sft.loop import run_sft


def sft_config(tiny_model, arith_data, out, *extra):
    train, held = arith_data
    return load_config("configs/tiny/sft.yaml", [
        f"model.path={tiny_model}", f"data.train={train}", f"data.eval={held}", f"train.output_dir={out}",
        "train.steps=500", "logging.progress=false", "logging.tensorboard=false", *extra])


def test_sft_learns_arithmetic(tiny_model, arith_data, tmp_path):
    """Loss falls far below its start and held-out exact match is clearly above zero."""
    result = run_sft(sft_config(tiny_model, arith_data, tmp_path / "run", "eval.samples=100"))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < 0.3 * losses[0]
    assert result["eval/accuracy"] >= 0.2
    # the exported folder is a normal HF folder holding the final weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").state_dict()
    final = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000500" / "model.safetensors"))
    assert final.keys() <= exported.keys()
    assert all(torch.equal(exported[k], v) for k, v in final.items())
    assert (tmp_path / "run" / "config.yaml").is_file()


def _losses(path):
    return [(m["step"], m["loss"]) for m in read_metrics(path) if "loss" in m]


def test_resume_continues_exactly(tiny_model, arith_data, tmp_path):
    common = ["train.steps=24", "logging.every=1", "checkpoint.every=0", "data.eval="]
    run_sft(sft_config(tiny_model, arith_data, tmp_path / "full", *common))
    run_sft(sft_config(tiny_model, arith_data, tmp_path / "cut", *common, "checkpoint.stop_after=10"))
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    run_sft(sft_config(tiny_model, arith_data, tmp_path / "cut", *common), resume=True)
    full, cut = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 25))
    torch.testing.assert_close(torch.tensor([v for _, v in cut]), torch.tensor([v for _, v in full]),
                               rtol=1e-6, atol=1e-7)


def test_packed_loss_equals_unpacked(tiny_model):
    """Packing samples into one row (positions restart) gives each sample the loss it has alone."""
    from r1cli.backends.torch_trainer import HiddenLoss
    from r1cli.config import DataConfig, ModelConfig
    from r1cli.data.sft_examples import pack_examples, to_token_batch, tokenize_rows
    from r1cli.data.synth import generate
    from r1cli.kernels.ops import fused_linear_logprobs
    from r1cli.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = load_model(ModelConfig(path=str(tiny_model)), torch.device("cpu")).eval()
    module = HiddenLoss(model)
    examples = tokenize_rows(generate("arithmetic", 12, seed=5, digits=3, ops="+-*"), tok,
                             DataConfig(max_seq_len=512), "synthetic")

    def nll(rows):
        ids, pos, idx, tgt = to_token_batch(rows).tensors(tok.pad_token_id, "cpu")
        with torch.no_grad():
            logp = module(ids, pos, idx, lambda h, w: fused_linear_logprobs(h, w, tgt, impl="torch")[0])
        return -logp.double().sum()

    packed = pack_examples(examples, 512)
    assert len(packed) < len(examples)
    separate = sum(nll([ex]) for ex in examples)
    torch.testing.assert_close(nll(packed), separate, rtol=1e-5, atol=1e-4)
    # and a mask that leaked across samples would change it: attend over the whole row
    ids, _, idx, tgt = to_token_batch(packed).tensors(tok.pad_token_id, "cpu")
    leaky_pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        leak = -module(ids, leaky_pos, idx,
                       lambda h, w: fused_linear_logprobs(h, w, tgt, impl="torch")[0]).double().sum()
    assert abs(float(leak - separate)) > 1e-2


# FSDP opt-in here: the default run holds two FSDP ranks to one in RL (LoRA), distillation and the streamed load
@pytest.mark.parametrize("dp", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_data_parallel_matches_one_process(tiny_model, arith_data, tmp_path, dp):
    train, _ = arith_data
    args = ["sft", "--config", "configs/tiny/sft.yaml", f"model.path={tiny_model}", f"data.train={train}",
            "data.eval=", "train.steps=6", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.export_hf=false"]
    one = run_r1(*args, f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=4", "train.grad_accum=2")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, f"train.output_dir={tmp_path / 'two'}", "train.micro_batch_size=4",
                   "train.grad_accum=1", f"parallel.torch.data_parallel={dp}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                               rtol=1e-4, atol=1e-5)


def _one_line_error(proc, needle):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert needle in lines[0]


def test_bad_inputs_give_one_clear_line(tiny_model, arith_data, tmp_path):
    train, _ = arith_data
    base = ["sft", "--config", "configs/tiny/sft.yaml", "logging.progress=false", f"train.output_dir={tmp_path}/x"]
    _one_line_error(run_r1(*base, "model.path=/no/such/model", f"data.train={train}"),
                    "model folder not found: /no/such/model")
    _one_line_error(run_r1(*base, f"model.path={tiny_model}", "data.train=/no/such.jsonl"),
                    "data file not found: /no/such.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=?", "response": "2"}) + "\n{oops\n")
    _one_line_error(run_r1(*base, f"model.path={tiny_model}", f"data.train={bad}"), "bad.jsonl:2: malformed JSON")
    _one_line_error(run_r1(*base, "optim.learning_rate=1"), "unknown config key 'optim.learning_rate'")
    _one_line_error(run_r1(*base, "train.steps=many"), "'train.steps': 'many' is not int")


def test_print_config_shows_merged_values():
    proc = run_r1("sft", "--config", "configs/tiny/sft.yaml", "--print-config", "optim.lr=0.5")
    assert proc.returncode == 0
    assert "lr: 0.5" in proc.stdout and "max_seq_len: 256" in proc.stdout
