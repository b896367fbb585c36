"""An option lives in the sub-section of the part that reads it; set for another backend or engine it is refused in
one line naming the reader, and a moved key still works with a note saying where it went."""

import pytest
from conftest import run_r1

from r1cli.config import load_config
from r1cli.errors import R1Error


@pytest.mark.parametrize("overrides, message", [
    (["parallel.megatron.sequence_parallel=true"],
     "config key 'parallel.megatron.sequence_parallel' is read only with parallel.backend=megatron; this run has "
     "parallel.backend=torch"),
    (["parallel.megatron.distributed_optimizer=false"], "read only with parallel.backend=megatron"),
    (["parallel.backend=megatron", "parallel.torch.data_parallel=fsdp"],
     "config key 'parallel.torch.data_parallel' is read only with parallel.backend=torch; this run has "
     "parallel.backend=megatron"),
    (["parallel.backend=megatron", "parallel.torch.fused_linear=one_pass"], "read only with parallel.backend=torch"),
    (["rollout.engine=hf", "rollout.vllm.kv_cache_gb=1"],
     "config key 'rollout.vllm.kv_cache_gb' is read only with rollout.engine=vllm; this run has rollout.engine=hf"),
    (["rollout.engine=hf", "rollout.vllm.tensor_parallel=2"], "read only with rollout.engine=vllm"),
])
def test_a_key_the_chosen_part_ignores_is_refused(overrides, message):
    with pytest.raises(R1Error, match=message.replace("(", r"\(")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["parallel.backend=megatron", "parallel.megatron.sequence_parallel=true"],
    ["parallel.torch.data_parallel=fsdp", "parallel.torch.fused_linear=one_pass"],
    ["rollout.engine=vllm", "rollout.vllm.kv_cache_gb=1"],
    ["rollout.engine=auto", "rollout.vllm.kv_cache_gb=1"],  # auto: vLLM wherever it runs
])
def test_keys_of_the_chosen_part_are_taken(overrides):
    load_config(None, overrides)


def test_the_refusal_is_one_line_before_any_model_loads(tmp_path):
    proc = run_r1("rl", "--config", "configs/tiny/zero.yaml", "model.path=/does/not/exist",
                  "rollout.vllm.sleep_level=0", f"train.output_dir={tmp_path}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == ["error: config key 'rollout.vllm.sleep_level' is read only with "
                                              "rollout.engine=vllm; this run has rollout.engine=hf (drop the key, or "
                                              "set rollout.engine=vllm)"]


@pytest.mark.parametrize("old, new, value", [
    ("parallel.data_parallel", "parallel.torch.data_parallel", "fsdp"),
    ("train.fused_linear", "parallel.torch.fused_linear", "one_pass"),
    ("rollout.kv_cache_gb", "rollout.vllm.kv_cache_gb", 2.0),
])
def test_a_moved_key_still_works_and_says_where_it_went(old, new, value, capsys):
    from r1cli.config import loading

    loading._noted.discard(old)
    engine = ["rollout.engine=vllm"] if "vllm" in new else []
    cfg = load_config(None, engine + [f"{old}={value}"])
    section, *path = new.split(".")
    node = getattr(cfg, section)
    for part in path:
        node = getattr(node, part)
    assert node == value
    assert f"note: config key '{old}' moved to '{new}'" in capsys.readouterr().err


def test_moved_keys_in_a_file_work_too(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("parallel: {data_parallel: fsdp, sequence_parallel: false}\ntrain: {fused_linear: one_pass}\n")
    cfg = load_config(str(f))
    assert cfg.parallel.torch.data_parallel == "fsdp" and cfg.parallel.torch.fused_linear == "one_pass"
