"""Mixtures of experts on the torch backend: routing figures, weights under their checkpoint names."""

import pytest
import torch

from r1cli.models.router_stats import RouterStats


def test_routing_figures_from_known_assignments():
    """4 experts, top-2, 6 tokens: expert 0 gets 6 assignments, 1 gets 4, 2 gets 2, 3 none (mean 3); uniform router
    probabilities make the balance term E * sum_i f_i * 1/E = 1 whatever the load."""
    stats = RouterStats()
    stats.start()
    top2 = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1], [0, 2], [0, 1]])
    stats.add("layer0", top2, torch.zeros(6, 4))
    m = stats.metrics()
    assert m["moe/load_imbalance"] == pytest.approx(6 / 3) and m["moe/load_min_share"] == 0.0
    assert m["moe/balance"] == pytest.approx(1.0)
    # router probabilities that follow the load: f = (1/2, 1/3, 1/6, 0) and P = f give E * sum f^2 = 4 * 14/36
    stats.start()
    f = torch.tensor([1 / 2, 1 / 3, 1 / 6, 1e-9])
    stats.add("layer0", top2, f.log().expand(6, 4))
    assert stats.metrics()["moe/balance"] == pytest.approx(4 * 14 / 36, rel=1e-6)
    assert stats.metrics() == {}  # nothing routed since


def test_a_routing_map_and_data_parallel_ranks_add_up():
    """megatron hands a [tokens, E] routing map; each data-parallel rank routes its own tokens, so counts are
    summed over ranks before the figures are taken (here a stand-in sum that doubles, as two equal ranks would)."""
    stats = RouterStats()
    stats.start()
    routing = torch.tensor([[True, False, True], [True, True, False]])
    stats.add("decoder.layers.0.mlp.router", routing, torch.zeros(2, 3))
    m = stats.metrics(lambda t: 2 * t)
    assert m["moe/load_imbalance"] == pytest.approx(2 / (4 / 3)) and m["moe/load_min_share"] == pytest.approx(0.75)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_weights_go_out_per_expert_and_load_back_into_the_fused_modules(family, tmp_path):
    """transformers 5 fuses a layer's experts into gate_up_proj / down_proj; the torch backend hands them out under
    the checkpoint's names (the files' own, so vLLM and the converter read them), and the transformers engine's
    copy takes them back into its fused tensors: a round trip reproduces every parameter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from r1cli.models.tiny import TinySpec, build_tiny_model
    from r1cli.models.weight_names import load_checkpoint_named, to_checkpoint_names

    path = build_tiny_model(tmp_path / "m", TinySpec(family=family, tie_word_embeddings=False))
    model = AutoModelForCausalLM.from_pretrained(path)
    out = dict(to_checkpoint_names(model, model.state_dict().items()))
    disk = load_file(path / "model.safetensors")
    assert out.keys() == disk.keys() and all(torch.equal(out[k], disk[k]) for k in disk)
    fresh = AutoModelForCausalLM.from_config(model.config)
    load_checkpoint_named(fresh, out.items())
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="no weight named"):
        load_checkpoint_named(fresh, [("model.layers.0.mlp.experts.9.nope.weight", torch.zeros(1))])
