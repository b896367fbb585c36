"""Student presets (configs/students/NAME.yaml) and the plan `r1 distill --dry-run` prints without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

from r1cli.config import CONFIG_DIR, Config
from r1cli.errors import R1Error

STUDENTS = CONFIG_DIR / "students"


# each preset's model as its config.json describes it (the public Hugging Face configs), so that --dry-run can plan
# a node's memory before the weights are downloaded
STUDENT_SHAPES = {
    "qwen-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "qwen-14b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                     num_key_value_heads=8, intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "qwen-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                     num_key_value_heads=8, intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
}


def student_size(cfg: Config):
    """The student's ModelSize: from model.path's config.json, else from the preset's known shape; None if
    neither."""
    from r1cli.run.memory_plan import model_size, size_of_config

    if (Path(cfg.model.path) / "config.json").is_file():
        return model_size(cfg.model.path)
    shape = STUDENT_SHAPES.get(cfg.distill.student)
    if shape is None:
        return None
    from transformers import AutoConfig

    fields = dict(shape)
    return size_of_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def known_students() -> list[str]:
    return sorted(p.stem for p in STUDENTS.glob("*.yaml"))


def student_sources(student: str) -> tuple[list[str], list[str]]:
    """(config files, overrides) for --student: a preset name, or a local Hugging Face folder."""
    preset = STUDENTS / f"{student}.yaml"
    if preset.is_file():
        return [str(preset)], []
    if Path(student).is_dir():
        return [], [f"model.path={student}", f"distill.student={student}"]
    import difflib

    close = difflib.get_close_matches(student, known_students(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise R1Error(f"unknown student '{student}': {hint}known presets: {', '.join(known_students())} "
                  f"({STUDENTS}), or give a local Hugging Face folder")


def architecture_of(path: str) -> str | None:
    """A one-line description from the folder's config.json (no weights read), or None without one."""
    try:
        c = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    h, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
    heads, kv = c.get("num_attention_heads"), c.get("num_key_value_heads", c.get("num_attention_heads"))
    inter = c.get("intermediate_size")
    size = ""
    if all(isinstance(v, int) for v in (h, layers, vocab, heads, kv, inter)):
        head = h // heads
        per_layer = h * head * (heads + 2 * kv) + head * heads * h + 3 * h * inter
        params = layers * per_layer + vocab * h * (1 if c.get("tie_word_embeddings") else 2)
        size = f", ~{params / 1e9:.1f}B parameters" if params >= 1e8 else f", {params / 1e6:.1f}M parameters"
    tied = ", tied embeddings" if c.get("tie_word_embeddings") else ""
    return (f"{c.get('model_type', '?')}: {layers} layers, hidden {h}, {heads} query / {kv} KV heads, "
            f"vocab {vocab}{tied}{size}")


def plan(cfg: Config, world_size: int) -> str:
    """What `r1 distill` would run: student, data, teacher, backend and layout, hyperparameters."""
    d, m, t, o, p = cfg.distill, cfg.model, cfg.train, cfg.optim, cfg.parallel
    found = architecture_of(m.path)
    where = "found" if found else "not found: put the Hugging Face folder there, set R1_MODELS or model.path"
    arch = f"{found} (config.json)" if found else (d.architecture or "unknown (no preset, no config.json)")
    if d.teacher:
        teacher = (f"{d.teacher}: logit distillation, {d.kl_direction} KL at temperature {d.temperature:g}, weight "
                   f"{d.kl_weight:g} beside the NLL, chunks of {d.chunk_tokens} tokens")
    else:
        teacher = "none: SFT on the teacher's samples (the paper's distillation)"
    dp = max(1, world_size // (p.tensor_parallel * p.pipeline_parallel))
    rows = [
        ("student", d.student or m.path),
        ("architecture", arch),
        ("model.path", f"{m.path} ({where})"),
        ("data", f"{cfg.data.train or '(none: give --data)'}; template {cfg.data.template}, sequences of "
                 f"{cfg.data.max_seq_len} tokens{', packed' if cfg.data.pack else ''}"),
        ("teacher", teacher),
        ("backend", f"{p.backend}, {p.torch.data_parallel if p.backend == 'torch' else 'megatron'} data parallel; "
                    f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {dp} on "
                    f"{world_size} rank{'s' if world_size > 1 else ''} (WORLD_SIZE)"),
        ("batch", f"micro {t.micro_batch_size} x accumulation {t.grad_accum} x DP {dp} = "
                  f"{t.micro_batch_size * t.grad_accum * dp} rows per step"),
        ("optimizer", f"AdamW lr {o.lr:g}, {o.schedule} schedule to {o.min_lr_ratio:g}x, warmup {o.warmup_steps}, "
                      f"weight decay {o.weight_decay:g}, clip {o.grad_clip:g}; {t.steps} steps"),
        ("precision", f"model.dtype {m.dtype}, gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}"),
        ("output", t.output_dir),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)
