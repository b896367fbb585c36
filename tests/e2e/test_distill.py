"""r1 distill: presets and the dry-run plan, unknown names, teacher data from a folder, and logit distillation
that pulls a student towards its teacher."""


import pytest
from conftest import run_r1, torchrun

from r1cli.config import load_config
from r1cli.data.records import read_records
from r1cli.distill.presets import STUDENTS, known_students
from r1cli.errors import R1Error
from r1cli.run.metrics import read_metrics

PRESETS = ["llama-70b", "llama-8b", "qwen-1.5b", "qwen-14b", "qwen-32b", "qwen-7b"]


def test_the_papers_students_are_presets():
    assert known_students() == PRESETS
    lrs = {}
    for name in PRESETS:
        cfg = load_config(str(STUDENTS / f"{name}.yaml"))  # every key valid, every range kept
        assert cfg.distill.student == name and cfg.model.path.startswith("models/")
        assert cfg.parallel.torch.data_parallel == "fsdp" and cfg.model.gradient_checkpointing
        lrs[name] = cfg.optim.lr
    assert lrs["qwen-1.5b"] > lrs["qwen-7b"] > lrs["qwen-14b"] > lrs["qwen-32b"] and lrs["llama-8b"] > lrs["llama-70b"]


def test_dry_run_prints_the_plan_without_weights(tmp_path):
    proc = run_r1("distill", "--student", "qwen-7b", "--data", str(tmp_path / "teacher"), "--dry-run",
                  "optim.lr=1e-5", env={"R1_MODELS": str(tmp_path / "models"), "WORLD_SIZE": "8"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "28 layers, hidden 3584, 28 query / 4 KV heads" in out  # the architecture, from the preset
    assert f"{tmp_path / 'models' / 'Qwen2.5-Math-7B'} (not found" in out  # the path convention, honestly missing
    assert "torch, fsdp data parallel; TP 1 x PP 1 x DP 8 on 8 ranks" in out
    assert "micro 1 x accumulation 8 x DP 8 = 64 rows per step" in out
    assert "AdamW lr 1e-05, cosine" in out and "25000 steps" in out  # the override wins over the preset
    assert "none: SFT on the teacher's samples" in out


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_dry_run_reads_a_local_folder(tiny_model):
    proc = run_r1("distill", "--student", str(tiny_model), "--dry-run", "--teacher", str(tiny_model))
    assert proc.returncode == 2 and proc.stderr.strip().endswith("needs teacher data: --data FILE_OR_FOLDER (or "
                                                                 "data.train=...)")  # the plan, then what is missing
    proc = run_r1("distill", "--student", str(tiny_model), "--dry-run", "--teacher", str(tiny_model), "--data",
                  "t.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "qwen2: 2 layers, hidden 64, 4 query / 2 KV heads" in proc.stdout and "(found)" in proc.stdout
    assert "forward KL at temperature 1, weight 0.5" in proc.stdout


def test_an_unknown_preset_lists_the_known_ones():
    proc = run_r1("distill", "--student", "qwen7b", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "did you mean 'qwen-7b'?" in proc.stderr and ", ".join(PRESETS) in proc.stderr


def test_teacher_data_from_a_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1", "response": "2"}\n{"prompt": "3", "response": "4"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "5", "response": "6"}\nnot json\n')
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(R1Error, match=r"b.jsonl:2: malformed JSON"):
        read_records(str(tmp_path))
    (tmp_path / "b.jsonl").write_text('{"prompt": "5", "response": "6"}\n{"prompt": "7"}\n')
    rows = read_records(str(tmp_path))
    assert [r["prompt"] for r in rows] == ["1", "3", "5", "7"] and rows.where(3) == f"{tmp_path}/b.jsonl:2"
    assert len(read_records(str(tmp_path), max_samples=3)) == 3


def _distill(tmp_path, student, teacher, data, name, *extra):
    proc = run_r1("distill", "--student", str(student), "--data", str(data), "--teacher", str(teacher),
                  "--config", "configs/tiny/sft.yaml", f"train.output_dir={tmp_path / name}", "train.steps=40",
                  "data.eval=", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
                  "checkpoint.export_hf=false", "optim.warmup_steps=0", *extra, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [m for m in read_metrics(tmp_path / name / "metrics.jsonl") if "kl" in m]


@pytest.mark.slow  # opt-in since the default run passed 15 minutes; the kernel's unit tests hold the maths
def test_logit_distillation_pulls_the_student_to_its_teacher(tmp_path, tiny_model, cold_start):
    """A student that is its own teacher has zero KL; a random student with a trained teacher gets closer to it
    (forward and reverse), and kl, nll and the loss in the log agree with the weighting."""
    data = cold_start / "train.jsonl"
    same = _distill(tmp_path, tiny_model, tiny_model, data, "same", "train.steps=1")
    assert abs(same[0]["kl"]) < 1e-5
    for direction in ("forward", "reverse"):
        log = _distill(tmp_path, tiny_model, cold_start / "sft" / "hf", data, direction,
                       f"distill.kl_direction={direction}", "distill.kl_weight=0.7")
        first, last = log[0], log[-1]
        assert last["kl"] < 0.75 * first["kl"], (direction, first["kl"], last["kl"])
        assert last["loss"] == pytest.approx(0.7 * last["kl"] + 0.3 * last["nll"], rel=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model, cold_start):
    from r1cli.models.tiny import TinySpec, build_tiny_model

    other = build_tiny_model(tmp_path / "other", TinySpec(vocab_size=300))
    proc = run_r1("distill", "--student", str(tiny_model), "--data", str(cold_start / "train.jsonl"), "--teacher",
                  str(other), "--config", "configs/tiny/sft.yaml", f"train.output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_a_sharded_teacher_gives_the_losses_of_a_whole_one(tmp_path, tiny_model, cold_start):
    """Under FSDP the teacher is sharded like the student (no GPU holds it whole): two FSDP ranks log the losses of
    two DDP ranks, whose teacher is whole on each."""
    base = ["distill", "--student", str(tiny_model), "--data", str(cold_start / "train.jsonl"), "--teacher",
            str(cold_start / "sft" / "hf"), "--config", "configs/tiny/sft.yaml", "train.steps=3", "data.eval=",
            "logging.every=1", "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false",
            "train.micro_batch_size=4"]
    for dp in ("ddp", "fsdp"):
        proc = torchrun(2, *base, f"parallel.torch.data_parallel={dp}", f"train.output_dir={tmp_path / dp}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    whole, sharded = ([m for m in read_metrics(tmp_path / dp / "metrics.jsonl") if "kl" in m] for dp in ("ddp", "fsdp"))
    assert len(whole) == len(sharded) == 3
    for key in ("kl", "nll", "loss"):
        assert [m[key] for m in sharded] == pytest.approx([m[key] for m in whole], rel=1e-4), key


@pytest.mark.parametrize("student", ["qwen-7b", "llama-70b"] + [pytest.param(s, marks=pytest.mark.slow) for s in
                                                                ("qwen-1.5b", "qwen-14b", "qwen-32b", "llama-8b")])
def test_every_preset_fits_the_gpus_its_header_names(student, tmp_path):
    """--dry-run plans a preset's memory before its weights exist (from the preset's known shape); each fits the
    80 GB GPUs its header is sized for."""
    import re

    from r1cli.config import CONFIG_DIR

    gpus = re.search(r"Sized for (\d+) x 80 GB", (CONFIG_DIR / "students" / f"{student}.yaml").read_text())
    proc = run_r1("distill", "--student", student, "--data", "teacher.jsonl", "--dry-run", "--gpus", gpus.group(1),
                  env={"R1_MODELS": str(tmp_path / "models")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert f"memory per GPU for r1 distill on {gpus.group(1)} GPUs of 80 GB" in proc.stdout
    assert re.search(r"total +[\d.]+ GB  fits", proc.stdout)
