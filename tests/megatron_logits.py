"""Run under torchrun with TP x PP (x DP) processes: convert an HF folder to that layout (experts over EP ranks),
build megatron-core's GPTModel stage by stage, load the shards, run one forward through megatron's pipeline
schedule and print (on the last stage) the largest difference between its logits, gathered over TP, and
transformers' for the same weights. With EP > 1 the data-parallel ranks each send the same rows through the
experts, which all-to-all dispatch spreads over the expert ranks.

    torchrun --nproc_per_node 2 tests/megatron_logits.py HF_FOLDER OUT_FOLDER TP PP [EP]
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from r1cli.backends.megatron.model import build_gpt_model, hf_config, import_megatron, load_converted  # noqa: E402


def main(src: Path, out: Path, tp: int, pp: int, ep: int = 1) -> None:
    dist.init_process_group("gloo")
    import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from r1cli.backends.megatron.convert import hf_to_megatron

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    mrandom.model_parallel_cuda_manual_seed(0)
    cfg = hf_config(src)
    if dist.get_rank() == 0:
        hf_to_megatron(src, out, tp=tp, pp=pp, ep=ep)
    dist.barrier()
    model = build_gpt_model(cfg, tp, pp, ep=ep).eval()
    load_converted(model, out)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, -1)
    kept = []

    def forward_step(data, m):
        def keep(output):
            kept.append(output)
            return output.sum() * 0, {}

        return m(next(data), positions, None), keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
                                    num_microbatches=1, seq_length=12, micro_batch_size=2, forward_only=True)
        if ps.is_pipeline_last_stage():
            logits = gather_from_tensor_model_parallel_region(kept[0])
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                diff = (logits[..., :cfg["vocab_size"]] - ref).abs().max()
                print("RESULT " + json.dumps({"max_diff": float(diff), "scale": float(ref.abs().max()),
                                              "padded": logits.shape[-1]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         int(sys.argv[5]) if len(sys.argv) > 5 else 1)
