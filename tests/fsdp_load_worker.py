"""Under torchrun: build an FSDP TorchTrainer (policy + reference) and report, per rank, how many times the weight
files were read, the size of the local shards, and whether the loaded model equals the files."""

import json
import sys

import torch
from safetensors.torch import load_file

import r1cli.backends.torch_trainer as tt
from r1cli.config import load_config

model_path, out = sys.argv[1], sys.argv[2]
reads = []
real_load = tt.load_model


def counting_load(cfg, device, weights=True):
    if weights:
        reads.append(cfg.dtype)
    return real_load(cfg, device, weights)


tt.load_model = counting_load
cfg = load_config("configs/tiny/zero.yaml", [f"model.path={model_path}", "parallel.torch.data_parallel=fsdp",
                                             "grpo.beta=0.05"])
trainer = tt.TorchTrainer(cfg.model, cfg.train, cfg.optim, cfg.parallel, need_reference=True)
rank = trainer.parallel.rank
local = sum(p.to_local().numel() for p in trainer.model.parameters())
total = sum(p.numel() for p in trainer.model.parameters())
full = trainer.full_state_dict()  # a collective
report = {"rank": rank, "reads": reads, "local": local, "total": total,
          "buffers_equal": all(torch.equal(b, b0) for (_, b), (_, b0) in
                                zip(trainer.model.named_buffers(), real_load(cfg.model, torch.device("cpu"))
                                    .named_buffers()))}
# after a no_grad pass no model stays gathered: FSDP2 keeps a root whole for a backward, which these never have
from torch.distributed.tensor import DTensor  # noqa: E402

from r1cli.token_batch import TokenBatch  # noqa: E402

batch = TokenBatch.from_completions([[1, 2, 3]], [[4, 5, 6, 7]])
for which, model in (("policy", trainer.model), ("reference", trainer.reference)):
    trainer.logprobs(batch, which)
    report[f"{which}_sharded_after_logprobs"] = all(isinstance(p, DTensor) for p in model.parameters())
if rank == 0:
    files = load_file(f"{model_path}/model.safetensors")
    report["weights_equal"] = all(torch.equal(full[k].float(), v.float()) for k, v in files.items() if k in full)
json.dump(report, open(f"{out}/rank{rank}.json", "w"))
