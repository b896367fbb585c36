"""One SFT step, then one GRPO step, through a trainer backend at a given layout; rank 0 writes the losses, the
log-probs before each step and the updated weights (as HF tensors) for tests/e2e/test_megatron_trainer.py.

    [torchrun --nproc_per_node N] tests/megatron_step.py HF_FOLDER OUT BACKEND TP PP [key=value ...]
        [--save DIR]  checkpoint after the SFT step      [--load DIR]  load that checkpoint instead of the SFT step
        [--export DIR]  the trainer's Hugging Face export after the GRPO step

Eight fixed rows of random tokens are the global batch; data-parallel rank d takes rows d, d + DP, ...
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from r1cli.config import load_config  # noqa: E402
from r1cli.interfaces import build_trainer  # noqa: E402
from r1cli.rl.objective import GRPOLoss, GRPOObjective  # noqa: E402
from r1cli.sft.loss import NLLLoss  # noqa: E402
from r1cli.token_batch import IGNORE, TokenBatch  # noqa: E402


def rows(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids, tgt, pos = [], [], []
    for b in range(8):
        n = 6 + 3 * b  # ragged rows: padding inside micro-batches is exercised
        row = torch.randint(0, vocab, (n,), generator=g).tolist()
        ids.append(row)
        tgt.append([IGNORE] * 2 + row[3:] + [IGNORE])  # the first two positions unscored
        cut = n // 2  # a packed row of two samples: positions restart half way
        pos.append(list(range(cut)) + list(range(n - cut)))
    return ids, tgt, pos


def main(src: Path, out: Path, backend: str, tp: int, pp: int, extra: list[str]) -> None:
    paths = {}
    for flag in ("--save", "--load", "--export"):
        if flag in extra:
            paths[flag] = Path(extra.pop(extra.index(flag) + 1))
            extra.remove(flag)
    save, load, export = paths.get("--save"), paths.get("--load"), paths.get("--export")
    cfg = load_config(None, [f"model.path={src}", f"parallel.backend={backend}", f"parallel.tensor_parallel={tp}",
                             f"parallel.pipeline_parallel={pp}", "train.device=cpu", "train.micro_batch_size=2",
                             "train.steps=10", "optim.lr=0.01", "optim.warmup_steps=0", "optim.schedule=constant",
                             "optim.grad_clip=1.0", "train.kernels=torch", *extra])
    trainer = build_trainer(cfg, need_reference=True)
    p = trainer.parallel
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids, tgt, pos = rows(vocab)
    mine = list(range(p.dp_rank, 8, p.dp_size))
    record: dict = {}

    # SFT: packed rows, mean NLL over the global batch's targets
    sft = TokenBatch([ids[i] for i in mine], [tgt[i] for i in mine], [pos[i] for i in mine])
    total = sum(sum(t != IGNORE for t in row) for row in tgt)
    if load:
        trainer.load(load)
    else:
        record["sft_logp"] = trainer.logprobs(sft).tolist()  # rank 0's rows: the whole batch when DP = 1
        record["sft"] = trainer.train_step(sft, NLLLoss(total))
    if save:
        if p.is_main:
            save.mkdir(parents=True)
        p.barrier()
        trainer.save(save, {"step": 1})
    record["after_sft_logp"] = trainer.logprobs(sft).tolist()

    # GRPO: completions after a 3-token prompt, advantages +-1, a reference and old log-probs; in every other row
    # completion tokens 1-2 are a tool's output (multi-turn rollouts): context, unscored
    prompts = [r[:3] for r in ids]
    completions = [r[3:] for r in ids]
    tool = [[i % 2 == 1 and j in (1, 2) for j in range(len(completions[i]))] for i in range(8)]
    batch = TokenBatch.from_completions([prompts[i] for i in mine], [completions[i] for i in mine],
                                        [tool[i] for i in mine])
    mask = batch.scored_mask()
    batch.fields.update(advantages=torch.tensor([1.0 if i % 2 else -1.0 for i in mine]), mask=mask,
                        loss_weight=torch.ones(len(mine)))
    sign = torch.tensor([1.0 if i % 3 else -1.0 for i in mine])[:, None]
    batch.fields["old_logp"] = trainer.logprobs(batch) - 0.3 * sign * mask  # off-policy: the ratio clips both ways
    batch.fields["ref_logp"] = trainer.logprobs(batch, "reference")
    objective = GRPOObjective(beta=0.04, temperature=0.9)
    seqs, tokens = p.all_reduce_sum(float(len(mine))), p.all_reduce_sum(float(mask.sum()))
    record["grpo_old_logp"] = batch.fields["old_logp"].tolist()
    record["grpo"] = trainer.train_step(batch, GRPOLoss(objective, seqs, tokens))
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", False)
    weights = {n: t.detach().float().cpu().clone() for n, t in trainer.named_weights()
               if not (tied and n == "lm_head.weight")}  # the torch backend also names the tied copy
    if export:
        trainer.export_hf(export)
    if p.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, out / "weights.safetensors")
        (out / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
