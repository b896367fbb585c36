"""The Megatron reference model's FP8 recipe (issue 40, finding 3). The reference runs only under no_grad, and
Transformer Engine updates a delayed recipe's scales only when leaving a grad-enabled fp8_autocast: built with the
policy's delayed recipe it would keep scale 1.0 for good and give wrong reference log-probs and KL. The trainer is
built on the CPU with Transformer Engine stood in by a recorder of the recipe each model is built with (the models
themselves are megatron-core's local layers)."""

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import json, sys
import r1cli.backends.megatron.trainer as t
from r1cli.config import load_config
from r1cli.interfaces import build_trainer

built = []
real = t.build_gpt_model
def recording(*args, fp8=None, te=False, **kw):  # the recipe asked for; the local layers built (no TE here)
    built.append(fp8)
    return real(*args, fp8=None, te=False, **kw)
t.build_gpt_model = recording
t.check_fp8 = lambda: None  # as on a Hopper GPU with Transformer Engine
t.use_te_layers = lambda choice, fp8, on_gpu: False
cfg = load_config(None, [f"model.path={sys.argv[1]}", "parallel.backend=megatron", "train.device=cpu",
                         "train.kernels=torch", "model.precision=fp8", f"model.fp8_recipe={sys.argv[2]}"])
trainer = build_trainer(cfg, need_reference=True)
trainer.update_reference()
print(json.dumps(built))
"""


def test_the_reference_takes_current_scaling_whatever_the_policys_recipe(tiny_model):
    for policy in ("delayed", "current"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model), policy], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [policy, "current"]  # the policy, then the reference


def test_megatron_local_attentions_s_by_s_scores_are_counted_and_refused_where_they_do_not_fit():
    """Megatron's local attention (no Transformer Engine) builds [rows, heads/TP, S, S] scores and an fp32 softmax
    per layer (issue 40, finding 8): at 7B (28 heads, 28 layers, bf16) one 32k-token row would hold terabytes, so
    it is one line naming the ways out rather than an out-of-memory deep in the forward; recompute keeps one
    layer's."""
    import pytest

    from r1cli.backends.megatron.model import check_local_attention, local_attention_bytes
    from r1cli.errors import R1Error

    s = 32768
    every_layer = local_attention_bytes(s, 1, 28, 28, 2, None)
    one_layer = local_attention_bytes(s, 1, 28, 28, 2, "selective")
    assert every_layer == 29 * 28 * s * s * 6 + s * s and one_layer == 2 * 28 * s * s * 6 + s * s
    assert local_attention_bytes(512, 2, 14, 28, 2, None) == 2 * 29 * 14 * 512 * 512 * 6 + 2 * 512 * 512
    with pytest.raises(R1Error, match=r"local attention .* \[S x S\] attention scores for 1 row\(s\) of 32768 "
                                      r"tokens .* install transformer-engine"):
        check_local_attention(s, 1, 28, 28, 2, None, free=80 << 30)
    check_local_attention(2048, 1, 28, 28, 2, None, free=80 << 30)  # 2k tokens: 19 GiB, fits
