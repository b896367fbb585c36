"""Under torchrun: for each variant, a TorchTrainer takes one GRPO step, one SFT step and one logit-distillation step
on long rows (samples of up to ~1k tokens, about 4k tokens packed per micro-batch); rank 0 writes what any layout of
the ranks must reproduce - the policy's log-probs before the steps, each step's metrics, the weights after them.

    python -m torch.distributed.run --nproc_per_node N tests/long_step_worker.py MODEL OUT VARIANT [VARIANT ...]

A VARIANT is NAME or NAME:key=value,key=value (config overrides); its results go to OUT/NAME/.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from r1cli.backends.torch_trainer import TorchTrainer
from r1cli.config import load_config
from r1cli.distill.loss import DistillLoss
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.sft.loss import NLLLoss
from r1cli.token_batch import TokenBatch

LENGTHS = [(40, 1000), (60, 900), (30, 1010), (80, 950), (50, 700), (20, 300)]  # (prompt, completion) tokens


def run(model_path: str, out: Path, overrides: list[str]) -> None:
    cfg = load_config("configs/tiny/zero.yaml", [f"model.path={model_path}", "grpo.beta=0.05", "optim.lr=1e-3",
                                                 "train.max_tokens_per_micro_batch=4096", *overrides])
    trainer = TorchTrainer(cfg.model, cfg.train, cfg.optim, cfg.parallel, need_reference=True)
    vocab = len(trainer.tokenizer)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (p,), generator=g).tolist() for p, _ in LENGTHS]
    completions = [torch.randint(4, vocab, (c,), generator=g).tolist() for _, c in LENGTHS]
    batch = TokenBatch.from_completions(prompts, completions)
    mask = batch.scored_mask()
    logp = trainer.logprobs(batch)
    ref = trainer.logprobs(batch, "reference")
    noise = lambda: 0.05 * torch.randn(mask.shape, generator=g) * mask  # noqa: E731
    batch.fields.update(advantages=torch.randn(len(LENGTHS), generator=g), mask=mask, old_logp=logp + noise(),
                        ref_logp=ref + noise())  # a ratio off 1 and a KL term to carry
    objective = GRPOObjective.from_config(cfg.grpo, 1.0, cfg.rollout.max_new_tokens)
    report = {"grpo": trainer.train_step(batch, GRPOLoss(objective, len(LENGTHS), float(mask.sum())))}
    rows = [p + c for p, c in zip(prompts, completions)]
    sft = TokenBatch(rows, [r[1:] + [-100] for r in rows])
    report["sft"] = trainer.train_step(sft, NLLLoss(float(sum(sft.counts))))
    # the model as it was loaded, against the policy two steps on
    teacher = trainer.frozen_copy(replace(cfg.model, path=model_path))[1]
    distill = DistillLoss(teacher, float(sum(sft.counts)), replace(cfg.distill, kl_weight=0.5),
                          trainer.tokenizer.pad_token_id)
    report["distill"] = trainer.train_step(sft, distill)
    weights = {name: t.detach().float().cpu().clone() for name, t in trainer.named_weights()}
    if trainer.parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({"logp": logp, "ref": ref}, str(out / "logprobs.safetensors"))
        save_file(weights, str(out / "weights.safetensors"))
        (out / "metrics.json").write_text(json.dumps(report))


if __name__ == "__main__":
    model, folder, *variants = sys.argv[1:]
    for v in variants:
        name, _, keys = v.partition(":")
        run(model, Path(folder) / name, [k for k in keys.split(",") if k])
