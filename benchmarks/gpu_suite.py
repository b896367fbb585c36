"""The one prepared command for a lent GPU (one H100 / H200): first the checks that reading the code cannot settle,
then the measurements, as one markdown report (a table of every check and figure, then the benchmark tables) with
the device, date and versions in its header.

Each part runs in its own process under its own time limit, so a crash or a hang costs that part only; a part
whose package is missing on the machine says so in one line and the rest goes on. The exit status is 1 when a
check failed.

    python benchmarks/gpu_suite.py --out docs/gpu_suite.md     # one GPU, under 10 minutes
    python benchmarks/gpu_suite.py --tiny                      # any machine (CI): every part at tiny sizes
    python benchmarks/gpu_suite.py --part kernels --tiny       # one part

The GPU machine has torch and Triton only: the small wheels travel with the command (megatron-core; vLLM and
Transformer Engine's 276 MB core wheel do not fit one call). Install them first and name their folder, so the
header lists them and their sizes:

    python benchmarks/fetch_gpu_wheels.py --out wheels --python 3.12        # here: the list, for the GPU's Python
    pip install --no-deps wheels/*.whl && python benchmarks/gpu_suite.py --wheels wheels --out docs/gpu_suite.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a plain checkout runs as it is (the GPU machine: torch, Triton and benchmarks/gpu_wheels.txt, no install): r1cli
# from here, in this process and in every process a part starts
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def row(part: str, item: str, result: str, status: str) -> dict:
    """status: ok | FAIL (a check that did not hold) | missing (its package is not installed) | measured | info"""
    return {"part": part, "item": item, "result": result, "status": status}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(work: Path, tiny: bool) -> Path:
    """A random model of the families r1 trains, built locally (no hub): tiny, or ~0.4B parameters with 128-wide
    heads (what vLLM's and TE's GPU attention kernels take) for the GPU measurements."""
    from r1cli.models.tiny import TinySpec, build_tiny_model

    out = work / ("model-tiny" if tiny else "model-0.4b")
    if (out / "config.json").is_file():
        return out
    spec = TinySpec(num_attention_heads=2, num_key_value_heads=1) if tiny else TinySpec(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=16384)
    return build_tiny_model(out, spec)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------- the checks
def part_setup(tiny: bool, work: Path) -> list[dict]:
    """What the machine gives the rest: a C compiler for Triton's launcher (Triton builds it on first use; without
    one every kernel fails at its first launch), where r1cli comes from, and the packages the parts use."""
    import importlib
    import shutil

    import torch

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    on_gpu = torch.cuda.is_available()
    rows = [row("setup", "a C compiler for Triton's launcher (CC, cc, gcc or clang)", cc or "none",
                "ok" if cc else ("FAIL" if on_gpu else "info"))]
    import r1cli

    rows.append(row("setup", "r1cli imported from", str(Path(r1cli.__file__).parent.parent), "info"))
    for name in ("triton", "transformers", "tokenizers", "safetensors", "peft", "math_verify", "megatron.core",
                 "vllm", "transformer_engine"):
        try:
            mod = importlib.import_module(name)
            rows.append(row("setup", f"import {name}", getattr(mod, "__version__", "imported"), "ok"))
        except ImportError as e:
            rows.append(row("setup", f"import {name}", str(e).splitlines()[0][:120], "missing"))
    return rows


def part_collectives(tiny: bool, work: Path) -> list[dict]:
    """The metric reductions r1 does, on the group device, through a real process group of one (NCCL on a GPU)."""
    import torch
    import torch.distributed as dist

    from r1cli.backends.parallel import DistributedContext, group_device, start_process_group

    device = _device()
    start_process_group(device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    backend = dist.get_backend()
    ctx = DistributedContext(device=group_device(device, 0))
    t = ctx.on_group_device(torch.tensor([1.5, 2.5], dtype=torch.float64))
    dist.all_reduce(t)
    box = [{"rows": [1, 2]}]
    dist.broadcast_object_list(box, src=0)
    gathered: list = [None]
    dist.all_gather_object(gathered, {"reward": 0.5})
    ok = t.tolist() == [1.5, 2.5] and box[0] == {"rows": [1, 2]} and gathered == [{"reward": 0.5}]
    rows = [row("collectives", f"{backend} group of one: all_reduce of a float64 placed by on_group_device "
                f"({t.device}), broadcast_object_list, all_gather_object", "as sent" if ok else "differs",
                "ok" if ok else "FAIL")]
    try:
        dist.all_reduce(torch.ones(1))
        unplaced = "accepted" + (" (gloo takes CPU tensors)" if backend == "gloo" else "")
    except (RuntimeError, ValueError) as e:
        unplaced = "refused: " + str(e).splitlines()[0][:90]
    rows.append(row("collectives", f"{backend}: a CPU tensor not placed (the defect the placement fixes)", unplaced,
                    "info"))
    return rows


def part_kernels(tiny: bool, work: Path) -> list[dict]:
    """The compiled Triton kernels against the torch reference, both fused paths, fp32 parameters under bf16
    autocast and bf16 parameters (under TRITON_INTERPRET=1 on a CPU)."""
    import torch

    from r1cli.kernels.ops import fused_linear_grpo_loss, fused_linear_grpo_objective
    from r1cli.rl.objective import GRPOObjective

    device = _device()
    n, V, H = (64, 1000, 64) if tiny else (16384, 152064, 3584)
    spec = GRPOObjective(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", temperature=1.0)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, H, device=device, generator=g)
    weight = torch.randn(V, H, device=device, generator=g) * H ** -0.5
    targets = torch.randint(0, V, (n,), device=device, generator=g)
    old = -torch.rand(n, device=device, generator=g) * 5
    ref = old + 0.1 * torch.randn(n, device=device, generator=g)
    adv = torch.randn(n, device=device, generator=g)
    mask = torch.ones(n, device=device)
    token_w = torch.full((n,), 1.0 / n, device=device)

    def run(path: str, impl: str, dtype: torch.dtype, autocast: bool):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if path == "two pass":
                loss, _ = fused_linear_grpo_loss(h, w, targets, old, ref, adv, mask, objective=spec, impl=impl)
                value = (loss * token_w).sum()
            else:
                value = fused_linear_grpo_objective(h, w, targets, old, ref, adv, mask, token_w, objective=spec,
                                                    impl=impl)[0]
        dh, dw = torch.autograd.grad(value, [h, w])
        return value.detach(), dh, dw

    rows = []
    for label, dtype, autocast in (("fp32 params, bf16 autocast", torch.float32, True),
                                   ("bf16 params", torch.bfloat16, False)):
        for path in ("two pass", "one pass"):
            got, want = run(path, "triton", dtype, autocast), run(path, "torch", dtype, autocast)
            errs = [_rel(a, b) for a, b in zip(got, want)]
            ok = errs[0] < 1e-2 and max(errs[1:]) < 3e-2 and got[1].dtype == dtype and got[2].dtype == dtype
            rows.append(row("kernels", f"fused linear GRPO, {path}, {label}, N={n} V={V} H={H}: Triton vs torch",
                            f"rel. error loss {errs[0]:.1e}, d(hidden) {errs[1]:.1e}, d(weight) {errs[2]:.1e}",
                            "ok" if ok else "FAIL"))
            del got, want
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def part_vllm(tiny: bool, work: Path) -> list[dict]:
    """vLLM beside a trainer: sleep, trainer-sized allocations, wake and reload (with and without handing the
    trainer's cached memory back first), and seeded against unseeded sampling."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [row("vllm", "sleep / wake / reload beside the trainer; seeded vs unseeded sampling",
                    "vllm not installed (pip install 'r1[vllm]'; its wheel does not travel in one call)", "missing")]
    import torch
    from safetensors.torch import load_file

    from r1cli.config import ModelConfig, RolloutConfig, VLLMEngineConfig
    from r1cli.interfaces import SamplingParams, build_engine

    model = _model(work, tiny)
    weights = load_file(str(model / "model.safetensors"))
    on_gpu = torch.cuda.is_available()
    engine = build_engine(ModelConfig(path=str(model)), RolloutConfig(
        engine="vllm", vllm=VLLMEngineConfig(kv_cache_gb=0.25 if tiny else 4.0, sleep_level=2)))
    inner = engine.engine if hasattr(engine, "engine") else engine
    prompts = [[5, 6, 7, 8 + i % 50] for i in range(32 if tiny else 512)]
    params = SamplingParams(n=1, temperature=1.0, max_tokens=16 if tiny else 128, seed=0)
    rows = []
    engine.generate(prompts[:4], params)  # warm-up

    def cycle(fill: float = 0.5) -> str:
        engine.sleep()
        if on_gpu:  # the trainer's turn: allocations as big as `fill` of the free memory, then freed into torch's cache
            free, _ = torch.cuda.mem_get_info()
            block = torch.empty(int(free * fill), dtype=torch.uint8, device="cuda")
            del block
        engine.load_weights(iter(weights.items()))
        out = engine.generate(prompts[:4], params)
        return f"{sum(len(c.completion_ids) for g in out for c in g)} tokens after the wake"

    try:
        rows.append(row("vllm", "sleep (level 2) -> trainer-sized allocation -> reload -> generate", cycle(), "ok"))
    except Exception as e:  # noqa: BLE001 - the report names it
        rows.append(row("vllm", "sleep (level 2) -> trainer-sized allocation -> reload -> generate",
                        f"{type(e).__name__}: {str(e)[:120]}", "FAIL"))
    if on_gpu:  # the same without emptying torch's cache before vLLM maps its memory again, the trainer's step having
        # taken nearly all the free memory (as a real one does): the defect the empty_cache is there for shows
        real = torch.cuda.empty_cache
        torch.cuda.empty_cache = lambda: None
        try:
            outcome = "worked: " + cycle(fill=0.95)
        except Exception as e:  # noqa: BLE001
            outcome = f"failed ({type(e).__name__}: {str(e)[:100]})"
        finally:
            torch.cuda.empty_cache = real
        rows.append(row("vllm", "the same cycle without torch.cuda.empty_cache() before the wake", outcome, "info"))
    else:
        rows.append(row("vllm", "sleep mode", "vLLM's CPU build has no sleep mode: the cycle ran awake", "info"))
    rates = {}
    for seeded in (True, False):
        inner.seeded = seeded
        engine.generate(prompts[:4], params)  # warm-up
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        rates[seeded] = sum(len(c.completion_ids) for g in out for c in g) / (time.perf_counter() - t0)
    rows.append(row("vllm", f"{len(prompts)} requests x {params.max_tokens} tokens: per-request seeds vs one "
                    "engine seed", f"seeded {rates[True]:.0f} tok/s, unseeded {rates[False]:.0f} tok/s "
                    f"({rates[False] / rates[True]:.2f}x)", "measured"))
    rows.append(_vllm_routing_row(work, on_gpu))
    return rows


def _vllm_routing_row(work: Path, on_gpu: bool) -> dict:
    """model.routing_replay with vLLM (its routed experts, Model Runner V2): the experts vLLM returns for a tiny
    Qwen3-MoE against the transformers trainer's own routing of the same tokens, then the trainer routed by them."""
    item = "routing replay: vLLM's routed experts vs the trainer's routing of the same tokens (tiny Qwen3-MoE)"
    if not on_gpu:
        return row("vllm", item, "vLLM records the experts on its Model Runner V2 only (Triton, a GPU)", "info")
    from dataclasses import replace

    from r1cli.config import load_config
    from r1cli.interfaces import SamplingParams, build_engine, build_trainer
    from r1cli.models.tiny import TinySpec, build_tiny_model
    from r1cli.rl.mismatch import engine_logprobs, mismatch_sums
    from r1cli.token_batch import TokenBatch

    try:
        path = work / "moe-routing"
        if not (path / "config.json").is_file():
            build_tiny_model(path, TinySpec(family="qwen3_moe", num_experts=8, num_experts_per_tok=2))
        cfg = load_config("configs/tiny/zero.yaml", [f"model.path={path}", "rollout.engine=vllm",
                                                     "model.routing_replay=record", "rollout.vllm.kv_cache_gb=0.25"])
        trainer = build_trainer(cfg)
        engine = build_engine(cfg.model, cfg.rollout, trainer)
        out = [c for g in engine.generate([[5, 6, 7 + i] for i in range(16)], SamplingParams(
            n=4, temperature=1.0, max_tokens=32, seed=0, logprobs=True)) for c in g]
        batch = TokenBatch.from_completions([c.prompt_ids for c in out], [c.completion_ids for c in out],
                                            routing=[c.routing for c in out])
        mask = batch.scored_mask()
        engine_logp = engine_logprobs([c.logprobs for c in out], mask.shape[1])
        figures = []
        for mode in ("record", "replay"):
            trainer.model_cfg = replace(trainer.model_cfg, routing_replay=mode)
            s = mismatch_sums(trainer.logprobs(batch), engine_logp, mask)
            figures.append((trainer.routing.take_agreement(), s["sum"] / s["count"]))
        (agree, own), (_, replayed) = figures
        return row("vllm", item, f"agreement {agree:.4f}; mismatch KL {own:.2e} routing itself, {replayed:.2e} "
                   "replayed", "ok" if replayed <= own else "FAIL")
    except Exception as e:  # noqa: BLE001 - the report names it
        return row("vllm", item, f"{type(e).__name__}: {str(e)[:120]}", "FAIL")


def _megatron_trainer(model: Path, layers: str, extra: list[str]):
    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer

    cfg = load_config("configs/tiny/sft.yaml", [f"model.path={model}", "parallel.backend=megatron",
                                                f"parallel.megatron.layers={layers}", "train.micro_batch_size=1",
                                                "model.gradient_checkpointing=false", *extra])
    return build_trainer(cfg)


def part_megatron(tiny: bool, work: Path) -> list[dict]:
    """A Megatron step in the GPU's precision (bf16 under model.dtype auto) at 8k tokens with the local and the
    Transformer Engine layers, its MFU, and FP8 with an odd row width."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return [row("megatron", "bf16 / FP8 steps", "megatron-core not installed (pip install 'r1[megatron]')",
                    "missing")]
    import torch

    from r1cli.sft.loss import NLLLoss
    from r1cli.token_batch import TokenBatch

    model = _model(work, tiny)
    S = 64 if tiny else 8192
    rows = []
    for layers, extra in (("local", []), ("te", []), ("te", ["model.precision=fp8"])):
        label = f"{layers} layers" + (", FP8, odd width" if extra else "")
        width = S - 1 if extra else S  # FP8: padded by the trainer to a multiple of 16 tokens per rank
        try:
            # on a CPU, bf16-mixed runs what auto runs on a GPU (bf16 parameters, fp32 main weights)
            trainer = _megatron_trainer(model, layers, extra + (["model.dtype=bf16-mixed"] if tiny else []))
        except Exception as e:  # noqa: BLE001 - TE missing is the usual case on the lent machine
            status = "missing" if "not installed" in str(e) else "FAIL"
            rows.append(row("megatron", f"{label}: one step at {width} tokens", str(e).splitlines()[0][:140],
                            status))
            continue
        batch = TokenBatch.from_completions([[5] * 16], [[7] * (width - 16)])
        loss = NLLLoss(width - 16)
        cuda = trainer.device.type == "cuda"
        trainer.train_step(batch, loss)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reps = 2 if tiny else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            out = trainer.train_step(batch, loss)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        params = sum(p.numel() for p in trainer.model.parameters())
        mfu = 6 * params * width / dt / (PEAK_BF16_TFLOPS * 1e12)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if cuda else ""
        ok = torch.isfinite(torch.tensor(out["loss"])).item()
        rows.append(row("megatron", f"{label}: one step at {width} tokens, {params / 1e6:.0f}M parameters, "
                        f"{trainer.dtype}", f"{dt * 1e3:.0f} ms, {width / dt:.0f} tok/s, MFU {mfu:.1%}{peak}, "
                        f"loss {out['loss']:.3f}", "measured" if ok else "FAIL"))
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    return rows


def part_rl(tiny: bool, work: Path) -> list[dict]:
    """`r1 rl` on one device: 3 steps with the engine auto picks (vLLM on a GPU where installed), KL, a reference
    refresh and a checkpoint, then --resume for a 4th; one step's tokens/s and its share of time generating. The
    refreshed reference is frozen in bf16 beside fp32 masters computing under bf16 autocast, so its KL right after a
    refresh is small, not zero: at most a tenth of the KL before it (the CPU checks this under model.dtype=bf16-mixed,
    which computes as a GPU does)."""
    from r1cli.data.records import write_jsonl
    from r1cli.data.synth import generate
    from r1cli.run.metrics import read_metrics

    model = _model(work, True)
    data = work / "rl-train.jsonl"
    write_jsonl(generate("arithmetic", 64, seed=0, digits=2, ops="+"), data)
    out = work / "rl-run"
    base = [sys.executable, "-m", "r1cli.cli", "rl", "--config", "configs/tiny/zero.yaml", f"model.path={model}",
            f"data.train={data}", "data.eval=", "rollout.engine=auto", "grpo.beta=0.04", "grpo.ref_update_every=2",
            "checkpoint.every=2", "model.dtype=bf16-mixed",
            "grpo.entropy_coef=0.01",  # a random model earns no reward: the entropy bonus still moves it (KL > 0)
            "grpo.prompts_per_step=8", "rollout.n=4", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.export_hf=false", f"train.output_dir={out}"]
    first = subprocess.run([*base, "train.steps=3", "--overwrite"], capture_output=True, text=True, cwd=ROOT)
    second = subprocess.run([*base, "train.steps=4", "--resume"], capture_output=True, text=True, cwd=ROOT)
    if first.returncode or second.returncode:
        bad = first if first.returncode else second
        return [row("rl", "r1 rl: 3 steps, a checkpoint, --resume", bad.stderr.strip().splitlines()[-1][:160],
                    "FAIL")]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    ok = [m["step"] for m in steps] == [1, 2, 3, 4] and steps[1]["kl"] > 0 and steps[2]["kl"] <= 0.1 * steps[1]["kl"]
    last = steps[-1]
    share = last["time/generate_s"] / (last["time/generate_s"] + last["time/train_s"])
    return [row("rl", "r1 rl: KL, reference refreshed at step 2, checkpoint, --resume to step 4",
                f"steps {[m['step'] for m in steps]}, kl {[round(m['kl'], 4) for m in steps]}",
                "ok" if ok else "FAIL"),
            row("rl", "one RL step (step 4, tiny model)", f"{last['rollout_tokens_per_s']:.0f} generated tok/s, "
                f"{last['train_tokens_per_s']:.0f} trained tok/s, {share:.0%} of the step generating", "measured")]


# ------------------------------------------------------------------------------------------------ the measurements
def _script(part: str, args: list[str], needs: str | None = None) -> tuple[list[dict], str]:
    if needs:
        try:
            __import__(needs)
        except ImportError:
            return [row(part, f"benchmarks/{args[0]}", f"{needs} not installed", "missing")], ""
    proc = subprocess.run([sys.executable, f"benchmarks/{args[0]}", *args[1:]], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        return [row(part, " ".join(args), proc.stderr.strip().splitlines()[-1][:160], "FAIL")], ""
    return [row(part, " ".join(args), "table below", "measured")], proc.stdout


def part_bench_kernels(tiny: bool, work: Path) -> tuple[list[dict], str]:
    """GRPO loss kernels and the fused linear against eager torch, torch.compile and Liger (ms, GB, TB/s)."""
    return _script("bench_kernels", ["grpo_kernels.py", "--smoke"] if tiny else
                   ["grpo_kernels.py", "--tokens", "16384", "--vocab", "152064", "--reps", "5"])


def part_bench_rollout(tiny: bool, work: Path) -> tuple[list[dict], str]:
    """vLLM against transformers generate, tokens/s."""
    if tiny:
        return _script("bench_rollout", ["rollout.py", "--smoke"], needs="vllm")
    model = _model(work, False)
    return _script("bench_rollout", ["rollout.py", "--model", str(model), "--prompts", "128", "--new-tokens", "256"],
                   needs="vllm")


MOE_SPECS = {  # (tiny, 0.3B-class) shapes of each MoE family the megatron backend expresses
    "qwen3_moe": (dict(family="qwen3_moe", num_attention_heads=2, num_key_value_heads=1),
                  dict(family="qwen3_moe", hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512,
                       max_position_embeddings=4096)),
    "deepseek_v3": (dict(family="deepseek_v3", num_hidden_layers=3, q_lora_rank=16, n_group=2, topk_group=1),
                    dict(family="deepseek_v3", hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, kv_lora_rank=256,
                         q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=4,
                         topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=4096)),
}


def part_moe(tiny: bool, work: Path) -> list[dict]:
    """Qwen3-MoE and DeepSeek-V3 through megatron-core on the GPU: what the CPU runs only through shims - the
    all-to-all token dispatcher's CUDA side stream and copies of the split sizes to the host - on the real CUDA
    path, and with Transformer Engine where it imports, its layers (DeepSeek-V3: TE's latent attention, whose core
    attention takes the narrower values, and its duplicated down projections). The log-probs of the Megatron
    trainer against the torch backend's (transformers' MoE modules) on the same rows, in the GPU's compute dtype,
    then one train step and its routing figures. Grouped GEMM experts are not wired."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return [row("moe", "megatron-core MoE on the GPU", "megatron-core not installed (pip install 'r1[megatron]')",
                    "missing")]
    import torch

    from r1cli.config import load_config
    from r1cli.interfaces import build_trainer
    from r1cli.models.tiny import TinySpec, build_tiny_model
    from r1cli.sft.loss import NLLLoss
    from r1cli.token_batch import TokenBatch

    rows = []
    for family, (small, large) in MOE_SPECS.items():
        out = work / (f"{family}-tiny" if tiny else f"{family}-0.3b")
        if not (out / "config.json").is_file():
            build_tiny_model(out, TinySpec(**(small if tiny else large)))
        S = 64 if tiny else 2048
        g = torch.Generator().manual_seed(0)
        rows_ = [torch.randint(0, 400, (S,), generator=g).tolist() for _ in range(2)]
        batch = TokenBatch.from_completions([r[:8] for r in rows_], [r[8:] for r in rows_])
        logp = {}
        for backend in ("torch", "megatron"):
            cfg = load_config("configs/tiny/sft.yaml", [f"model.path={out}", f"parallel.backend={backend}",
                                                        "train.micro_batch_size=2",
                                                        "model.gradient_checkpointing=false"])
            trainer = build_trainer(cfg)
            logp[backend] = trainer.logprobs(batch).float().cpu()
            if backend == "megatron":
                t0 = time.perf_counter()
                stats = trainer.train_step(batch, NLLLoss(sum(len(r) - 8 for r in rows_)))
                dt = time.perf_counter() - t0
            del trainer
        rel = _rel(logp["megatron"], logp["torch"])
        figures = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in stats.items() if k.startswith("moe/"))
        rows += [row("moe", f"{family}: megatron-core log-probs vs transformers', {2 * S} tokens",
                     f"relative difference {rel:.2e}", "ok" if rel < 2e-2 else "FAIL"),
                 row("moe", f"{family}: one megatron train step",
                     f"{dt * 1e3:.0f} ms, loss {stats['loss']:.3f}; {figures}",
                     "measured" if torch.isfinite(torch.tensor(stats["loss"])).item() else "FAIL")]
    return rows


# part: (function, seconds allowed on a GPU, environment)
PARTS = {
    "setup": (part_setup, 60, {}),
    "collectives": (part_collectives, 60, {"R1_CHECK_COLLECTIVES": "1"}),
    "kernels": (part_kernels, 150, {}),
    "vllm": (part_vllm, 150, {}),
    "megatron": (part_megatron, 120, {}),
    "moe": (part_moe, 150, {}),
    "rl": (part_rl, 120, {}),
    "bench_kernels": (part_bench_kernels, 120, {}),
    "bench_rollout": (part_bench_rollout, 90, {}),
}


def header(wheels: str | None) -> str:
    import platform

    import torch

    versions = [f"torch {torch.__version__}"]
    for name in ("triton", "megatron.core", "vllm", "transformer_engine", "transformers", "liger_kernel"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            versions.append(f"{name} {getattr(mod, '__version__', '?')}")
        except ImportError:
            versions.append(f"{name} -")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or "?") if Path("/proc/cpuinfo").is_file() else platform.processor() or "?"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}, {os.cpu_count()} cores"
    lines = ["# r1 GPU suite", "", f"device: {device}  ", f"date: {time.strftime('%Y-%m-%d %H:%M')}  ",
             f"versions: {', '.join(versions)}  "]
    if wheels:
        found = sorted(Path(wheels).glob("*.whl"))
        lines.append("wheels carried: " + (", ".join(f"{w.name} ({w.stat().st_size / 2**20:.1f} MB)" for w in found)
                                           or "none"))
    return "\n".join(lines)


def run_part(name: str, tiny: bool, work: Path) -> tuple[list[dict], str]:
    """The part in its own process, under its time limit."""
    fn, seconds, env = PARTS[name]
    env = {**os.environ, **env}
    if name in ("kernels", "bench_kernels") and _device().type == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", name, "--work", str(work), "--json", str(result)] + \
        (["--tiny"] if tiny else [])
    limit = seconds * (5 if tiny else 1)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        return [row(name, "the whole part", f"over its {limit} s limit", "FAIL")], ""
    if not result.is_file():  # the part died before it could report (a failed check still reports)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [row(name, "the whole part", f"exit {proc.returncode}: {last[:160]}", "FAIL")], ""
    got = json.loads(result.read_text())
    return got["rows"], got["text"]


def render(rows: list[dict], texts: dict[str, str], head: str) -> str:
    lines = [head, "", "| part | check or measurement | result | status |", "|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['item']} | {r['result'].replace('|', '/')} | {r['status']} |" for r in rows]
    for name, text in texts.items():
        if text:
            lines += ["", f"## {name}", "", "```", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="every part at tiny sizes on this machine (CI)")
    ap.add_argument("--part", choices=sorted(PARTS), help="run one part here and now (what the suite runs per part)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--wheels", help="the folder of wheels carried to the machine (listed in the header)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="r1-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.part:
        got = PARTS[args.part][0](args.tiny, work)
        rows, text = got if isinstance(got, tuple) else (got, "")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "text": text}))
        else:
            print(render(rows, {args.part: text}, f"# {args.part}"))
        return int(any(r["status"] == "FAIL" for r in rows))
    rows, texts = [], {}
    for name in PARTS:
        t0 = time.perf_counter()
        got, text = run_part(name, args.tiny, work)
        print(f"{name}: {time.perf_counter() - t0:.0f} s, " + ", ".join(r["status"] for r in got), file=sys.stderr,
              flush=True)
        rows += got
        texts[name] = text
    report = render(rows, texts, header(args.wheels))
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return int(any(r["status"] == "FAIL" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
