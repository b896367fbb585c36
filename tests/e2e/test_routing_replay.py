"""MoE routing replay (model.routing_replay) on a tiny qwen3_moe: the transformers engine records the experts of every
token, the trainer routed through them takes exactly those experts, and its log-probs then sit closer to the
engine's than when it routes itself, in the loop's own logged mismatch too; vLLM's routed experts read as r1's."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1cli.backends.hf_rollout import HFGenerateEngine
from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.interfaces import SamplingParams, build_trainer
from r1cli.models.loading import load_model
from r1cli.models.routing_replay import routers
from r1cli.models.tiny import TinySpec, build_tiny_model
from r1cli.rl.loop import run_rl, validate
from r1cli.rl.mismatch import engine_logprobs, mismatch_sums
from r1cli.run.metrics import read_metrics
from r1cli.token_batch import TokenBatch


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny qwen3_moe, and a copy whose routers' weights are perturbed by 30%: an engine that routes some tokens
    elsewhere (as other kernels and near-ties do in a real engine) with the same experts - on any CPU."""
    root = tmp_path_factory.mktemp("moe")
    model = build_tiny_model(root / "model", TinySpec(family="qwen3_moe", num_experts=8, num_experts_per_tok=2))
    engine = root / "engine"
    engine.mkdir()
    for f in model.iterdir():
        (engine / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(0)
    sd = load_file(str(engine / "model.safetensors"))
    sd = {k: v * (1 + 0.3 * torch.randn(v.shape, generator=g)) if k.endswith("mlp.gate.weight") else v
          for k, v in sd.items()}
    save_file(sd, str(engine / "model.safetensors"), metadata={"format": "pt"})
    return model, engine


def _cfg(path, mode="replay", *extra):
    return load_config("configs/tiny/zero.yaml", [f"model.path={path}", "rollout.engine=hf", "train.device=cpu",
                                                 f"model.routing_replay={mode}", *extra])


def test_replayed_routing_is_the_recorded_one_and_the_mismatch_falls(moe):
    model, engine_path = moe
    trainer = build_trainer(_cfg(model))
    # an engine of its own (the perturbed copy) recording as a trainer's engine does
    engine = HFGenerateEngine(load_model(_cfg(engine_path).model, torch.device("cpu")).eval(), trainer.tokenizer,
                              _cfg(engine_path).rollout, torch.device("cpu"), routing="replay")
    prompts = [[5 + i, 6, 7 + 2 * i, 8][: 2 + i % 3] for i in range(8)]
    samples = [c for g in engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=1,
                                                                  logprobs=True)) for c in g]
    layers = len(routers(trainer.model))
    for c in samples:  # every input position has its experts; only the last token was never fed back
        assert c.routing.shape == (len(c.prompt_ids) + len(c.completion_ids), layers, 2)
        assert (c.routing[:-1] >= 0).all() and len(c.logprobs) == len(c.completion_ids)
    batch = TokenBatch.from_completions([c.prompt_ids for c in samples], [c.completion_ids for c in samples],
                                        routing=[c.routing for c in samples])
    mask = batch.scored_mask()
    engine_logp = engine_logprobs([c.logprobs for c in samples], mask.shape[1])
    used = []  # the experts each router call of the trainer's forward went to (after the replay hook)
    for m in routers(trainer.model):
        m.register_forward_hook(lambda mod, args, out: used.append(out[2].clone()))
    mismatch, agreement = {}, {}
    for mode in ("record", "replay"):
        trainer.model_cfg = replace(trainer.model_cfg, routing_replay=mode)
        used.clear()
        logp = trainer.logprobs(batch)
        s = mismatch_sums(logp, engine_logp, mask)
        mismatch[mode], agreement[mode] = s["sum"] / s["count"], trainer.routing.take_agreement()
        if mode == "replay":  # token for token, layer by layer: the recorded experts
            grid = batch.routing_grid()
            recorded = grid >= 0
            got = torch.stack(used, 1)  # [tokens, layers, k]: one micro-batch, layers in order
            assert torch.equal(got[recorded.all(-1)], grid[recorded.all(-1)].long())
    assert agreement["record"] < 0.9  # the perturbed engine routed many tokens elsewhere
    assert mismatch["replay"] < 0.5 * mismatch["record"], mismatch


def test_the_record_lines_up_with_the_trainers_tokens(moe):
    """The trainer's own engine (its module, colocated): the recorded experts sit at the positions the trainer's
    forward routes - it chooses the same ones almost everywhere (ties aside) - and the generation's log-probs are
    the trainer's to rounding. A record shifted by one position would agree at chance (2 of 8 experts)."""
    from r1cli.interfaces import build_engine

    cfg = _cfg(moe[0], "record")
    trainer = build_trainer(cfg)
    engine = build_engine(cfg.model, cfg.rollout, trainer)
    samples = [c for g in engine.generate([[5, 6, 7], [9, 10], [11, 12, 13, 14]], SamplingParams(
        n=4, temperature=1.0, max_tokens=24, seed=2, logprobs=True)) for c in g]
    batch = TokenBatch.from_completions([c.prompt_ids for c in samples], [c.completion_ids for c in samples],
                                        routing=[c.routing for c in samples])
    logp = trainer.logprobs(batch)
    assert trainer.routing.take_agreement() > 0.95
    mask = batch.scored_mask()
    for i, c in enumerate(samples):
        torch.testing.assert_close(logp[i, : len(c.logprobs)], torch.tensor(c.logprobs), rtol=0, atol=1e-4)
    assert mask.sum() > 30


def test_an_rl_run_logs_a_smaller_mismatch_with_replay(moe, arith_data, tmp_path, monkeypatch):
    """The loop's own figures: one-step-off runs (the engine holds its own copy) whose engine copy has its routers
    perturbed after every weight load (an engine that routes some tokens elsewhere), at lr 0 so that both runs see
    the same samples: the logged rollout/mismatch_kl with replay is far below the one without, every step."""
    model, _ = moe
    load = HFGenerateEngine.load_weights

    def perturbed(self, weights):
        load(self, weights)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in routers(self.model):
                m.weight.mul_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))

    monkeypatch.setattr(HFGenerateEngine, "load_weights", perturbed)
    common = [f"model.path={model}", f"data.train={arith_data[0]}", "data.eval=", "logging.progress=false",
              "logging.tensorboard=false", "logging.sample_every=0", "train.steps=3", "grpo.prompts_per_step=4",
              "rollout.n=4", "checkpoint.export_hf=false", "rollout.max_new_tokens=16", "rollout.asynchronous=true",
              "rollout.tis_cap=2.0", "optim.lr=0.0"]
    logged = {}
    for mode in ("record", "replay"):
        run_rl(load_config("configs/tiny/zero.yaml", [*common, f"train.output_dir={tmp_path / mode}",
                                                      f"model.routing_replay={mode}"]))
        logged[mode] = [m for m in read_metrics(tmp_path / mode / "metrics.jsonl") if "loss" in m]
    assert len(logged["record"]) == len(logged["replay"]) == 3
    for rec, rep in zip(logged["record"], logged["replay"]):
        assert rec["reward/total"] == rep["reward/total"]  # the same samples
        assert rec["moe/routing_agreement"] < 0.9  # the engine routed many token-layers elsewhere
        assert rep["rollout/mismatch_kl"] < 0.5 * rec["rollout/mismatch_kl"], (rep, rec)
    from r1cli.run.report import write_report

    assert "routing replay: share of token-layers" in write_report(str(tmp_path / "replay")).read_text()


def test_what_it_cannot_replay_is_refused(moe, tiny_model):
    for extra, match in [(["parallel.backend=megatron"], "parallel.backend=torch"),
                         (["parallel.context_parallel=2"], "context_parallel=1"),
                         (["rollout.tools=[python]"], "rollout.tools")]:
        with pytest.raises(R1Error, match=match):
            validate(_cfg(moe[0], "replay", *extra))
    with pytest.raises(R1Error, match="no top-k routers"):
        build_trainer(_cfg(tiny_model))
    validate(_cfg(moe[0], "record", "rollout.tis_cap=2.0"))  # the engine's log-probs now come from generation


def test_vllm_routing_is_read_as_r1s_and_needs_a_gpu(monkeypatch):
    """vLLM returns every position's experts but the last (routed_experts [positions - 1, layers, k]); its Model
    Runner V2 that records them needs Triton, so on a CPU it is one line."""
    from types import SimpleNamespace

    import numpy as np

    from r1cli.backends.vllm_rollout import completion_routing, routing_kwargs

    rows = np.arange(5 * 3 * 2).reshape(5, 3, 2) % 8
    got = completion_routing(SimpleNamespace(routed_experts=rows), 6)
    assert got.shape == (6, 3, 2) and got.dtype == torch.int16
    assert torch.equal(got[:5], torch.as_tensor(rows).to(torch.int16)) and (got[5] == -1).all()
    with pytest.raises(R1Error, match="no routed experts"):
        completion_routing(SimpleNamespace(routed_experts=None), 6)
    cfg = _cfg("m")
    assert routing_kwargs(replace(cfg.model, routing_replay="off"), on_gpu=False) == {}
    with pytest.raises(R1Error, match="needs Triton on a GPU"):
        routing_kwargs(cfg.model, on_gpu=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert routing_kwargs(cfg.model, on_gpu=True) == {"enable_return_routed_experts": True}
    assert __import__("os").environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


@pytest.mark.slow
def test_a_tiny_moe_r1_zero_run_learns_with_replay_and_lr_zero_does_not(tmp_path):
    """The demo's recipe on a mixture of experts: the tiny qwen3_moe cold-started on the demo's data, then R1-Zero
    with routing replay - held-out accuracy up by 0.20 or more; at lr 0 it stays."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_cold_start  # noqa: E402
    from test_rl import eval_curve, rl_config  # noqa: E402

    model = build_tiny_model(tmp_path / "moe", TinySpec(family="qwen3_moe", num_experts=8, num_experts_per_tok=2))
    cold = make_cold_start(model, tmp_path / "cold")
    run_rl(rl_config(cold, tmp_path / "run", "model.routing_replay=replay"))
    before, after = eval_curve(tmp_path / "run")
    assert after - before >= 0.20, (before, after)
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert all(0.9 <= m["moe/routing_agreement"] <= 1.0 for m in steps)
    run_rl(rl_config(cold, tmp_path / "lr0", "model.routing_replay=replay", "optim.lr=0.0", "train.steps=16"))
    before0, after0 = eval_curve(tmp_path / "lr0")
    assert before0 == before and abs(after0 - before0) < 0.05, (before0, after0)
