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


def test_sigmoid_scores_count_normalised_per_token():
    """DeepSeek-V3's router scores each expert by a sigmoid; the balance term takes them normalised to sum 1 per
    token (its sequence-wise balance loss's s'), so equal logits give 1 whatever their value, and scores that
    follow the load give E * sum f^2 as softmax probabilities would."""
    stats = RouterStats()
    top2 = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1], [0, 2], [0, 1]])
    for level in (-3.0, 0.0, 2.0):
        stats.start()
        stats.add("layer0", top2, torch.full((6, 4), level), "sigmoid")
        assert stats.metrics()["moe/balance"] == pytest.approx(1.0)
    stats.start()
    f = torch.tensor([1 / 2, 1 / 3, 1 / 6, 1e-9])
    stats.add("layer0", top2, torch.logit(f / 2).expand(6, 4), "sigmoid")  # sigmoid(logit(f/2)) = f/2
    assert stats.metrics()["moe/balance"] == pytest.approx(4 * 14 / 36, rel=1e-6)


def test_the_torch_backend_hooks_deepseek_v3_routers(tmp_path):
    """transformers' DeepSeek-V3 router (DeepseekV3TopkRouter: sigmoid scores with the expert bias) is hooked in
    every MoE layer (not the dense first one): each token's top-k experts are counted."""
    from transformers import AutoModelForCausalLM

    from r1cli.models.router_stats import hook_transformers_routers
    from r1cli.models.tiny import TinySpec, build_tiny_model

    path = build_tiny_model(tmp_path / "m", TinySpec(family="deepseek_v3", num_hidden_layers=3))
    model = AutoModelForCausalLM.from_pretrained(path)
    stats = RouterStats()
    assert hook_transformers_routers(model, stats) == 2
    stats.start()
    model(torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0)))
    assert sorted(stats.counts) == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert all(float(c.sum()) == 2 * 9 * 2 for c in stats.counts.values())  # 18 tokens x top 2
    m = stats.metrics()
    assert 1.0 <= m["moe/load_imbalance"] <= 4.0 and 1.0 <= m["moe/balance"] <= 4.0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
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


def test_the_torch_backend_adds_transformers_own_load_balancing_loss(tmp_path):
    """An SFT step on a tiny Qwen3-MoE with router_aux_loss_coef 0.5: the loss and gradient norm equal those of
    transformers' own causal-LM loss with output_router_logits (mean token NLL + 0.5 x its load-balancing loss)
    on the same rows; the routing figures leave the padding of a ragged micro-batch out."""
    from transformers import AutoModelForCausalLM

    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer
    from r1cli.models.tiny import TinySpec, build_tiny_model
    from r1cli.sft.loss import NLLLoss
    from r1cli.token_batch import IGNORE, TokenBatch

    path = build_tiny_model(tmp_path / "m", TinySpec(family="qwen3_moe", router_aux_loss_coef=0.5))
    cfg = load_config(None, [f"model.path={path}", "train.device=cpu", "train.kernels=torch", "optim.lr=0",
                             "optim.grad_clip=0", "train.micro_batch_size=4", f"train.output_dir={tmp_path}"])
    trainer = build_trainer(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (3, 12), generator=g)
    batch = TokenBatch(ids.tolist(), [r[1:] + [IGNORE] for r in ids.tolist()])
    out = trainer.train_step(batch, NLLLoss(3 * 11))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = model(ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert out["loss"] == pytest.approx(float((ref.loss - 0.5 * ref.aux_loss).detach()), rel=1e-5)  # the NLL alone
    assert out["moe/aux_loss"] == pytest.approx(float(ref.aux_loss.detach()), rel=1e-5)
    assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    # padding: a row of 12 and a row of 5 route 17 tokens per layer, not 24
    trainer.router_stats.start()
    ragged = TokenBatch([ids[0].tolist(), ids[1, :5].tolist()], [ids[0, 1:].tolist() + [IGNORE],
                                                                 ids[1, 1:5].tolist() + [IGNORE]])
    trainer.train_step(ragged, NLLLoss(15))
    assert trainer.router_stats.tokens == {}  # reset by the step's metrics; count through a fresh step instead
    seen, add = [], trainer.router_stats.add

    def counting(layer, experts, logits, score):
        seen.append(int(trainer.router_stats.mask.sum()))
        add(layer, experts, logits, score)

    trainer.router_stats.add = counting
    trainer.train_step(ragged, NLLLoss(15))
    assert seen and set(seen) == {17}
