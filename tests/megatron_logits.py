"""Run under torchrun: convert an HF folder for TP = world size, build megatron-core's GPTModel, load the shards and
print the largest difference between its logits (gathered over TP) and transformers' for the same weights."""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from r1cli.backends.megatron.model import build_gpt_model, hf_config, import_megatron, load_converted  # noqa: E402


def main(src: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from r1cli.backends.megatron.convert import hf_to_megatron

    tp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    mrandom.model_parallel_cuda_manual_seed(0)
    cfg = hf_config(src)
    if dist.get_rank() == 0:
        hf_to_megatron(src, out, tp=tp, pp=1)
    dist.barrier()
    model = build_gpt_model(cfg, tp, 1).eval()
    load_converted(model, out)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(ids, torch.arange(12).expand(2, -1), None))
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    if dist.get_rank() == 0:
        diff = (logits[..., :cfg["vocab_size"]] - ref).abs().max()
        print("RESULT " + json.dumps({"max_diff": float(diff), "scale": float(ref.abs().max()),
                                      "padded": logits.shape[-1]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
