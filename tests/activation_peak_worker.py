"""Under torchrun: the activation peak of one SFT step on one sample of TOKENS tokens, as torch's MemTracker counts it
(every live tensor's bytes less the parameters, gradients and AdamW state), beside the memory plan's estimate for
the same micro-batch on this rank; rank 0 prints both as JSON.

    python -m torch.distributed.run --nproc_per_node N tests/activation_peak_worker.py MODEL TOKENS [key=value ...]
"""

import json
import sys

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from r1cli.config import load_config
from r1cli.interfaces import build_trainer
from r1cli.run.memory_plan import activation_bytes, model_size, plan
from r1cli.sft.loss import NLLLoss
from r1cli.token_batch import TokenBatch

model, tokens, *overrides = sys.argv[1:]
n = int(tokens)
cfg = load_config("configs/tiny/sft.yaml", [f"model.path={model}", "train.micro_batch_size=1",
                                            f"data.max_seq_len={n}", *overrides])
rows = dict(plan(cfg, "sft", gpus=1, device="cpu"))
resident = rows["parameters"] + rows["gradients"] + rows["AdamW state"]
trainer = build_trainer(cfg)
ids = [(i * 7) % 400 + 4 for i in range(n + 1)]
batch = TokenBatch([ids[:n]], [ids[1:n] + [-100]])
trainer.train_step(batch, NLLLoss(n - 1))  # the optimizer state exists from here on
tracker = MemTracker()
tracker.track_external(trainer.loss_module, trainer.optimizer)
with tracker:
    trainer.train_step(batch, NLLLoss(n - 1))
peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
if trainer.parallel.is_main:
    print(json.dumps({"measured": peak - resident,
                      "planned": activation_bytes(cfg, model_size(model), n, torch.device("cpu"))}))
