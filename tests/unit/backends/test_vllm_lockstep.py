"""vLLM data-parallel ranks step together (issue 40, finding 1). With `external_launcher` and world > TP, every
torchrun rank is a vLLM data-parallel rank, and vLLM all-reduces "unfinished requests" over them at every engine
step (an idle rank runs dummy steps): a rank that does not enter `llm.generate` as often as the others leaves them
waiting forever. Two gloo ranks, each a VLLMEngine over a recording stand-in for vllm.LLM, in the three places
where r1 gave ranks different work: a replica's non-leader (no prompts), held-out rows split unevenly over ranks
(257 rows on 8 ranks) with rollout.prompts_per_generate, and tool rollouts taking more turns on one rank."""

import json
import socket
import sys
import types

import torch

TURNS_ON_RANK0 = 3  # rank 0's sample calls the tool twice, then answers; rank 1's answers at once


class RecordingLLM:
    """vllm.LLM's generate: records each call's prompt count; rank 0 answers through the python tool."""

    def __init__(self, tok, rank):
        self.tok, self.rank, self.calls = tok, rank, []

    def generate(self, prompts, requests, use_tqdm=False):
        self.calls.append(len(prompts))
        outs = []
        for p, r in zip(prompts, requests):
            context = self.tok.decode(p["prompt_token_ids"])
            if self.rank == 0 and context.count("```output") < TURNS_ON_RANK0 - 1:
                text = "```python\nprint(1)\n```\n```output"
            else:
                text = "<answer>1</answer>"
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            outs.append(types.SimpleNamespace(outputs=[
                types.SimpleNamespace(index=j, token_ids=ids, finish_reason="stop", logprobs=None)
                for j in range(r.n)]))
        return outs


def _fake_vllm():
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    vllm.inputs = inputs
    sys.modules.update({"vllm": vllm, "vllm.inputs": inputs})


def _worker(rank: int, port: int, model: str, out: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _fake_vllm()
    import torch.distributed as dist

    from r1cli.backends.vllm_rollout import VLLMEngine, lockstep_group
    from r1cli.config import RolloutConfig
    from r1cli.interfaces import SamplingParams
    from r1cli.models.loading import load_tokenizer
    from r1cli.tools.turns import TurnSettings, generate_with_tools

    dist.init_process_group("gloo")
    from r1cli.backends.parallel import check_collectives

    check_collectives()  # as in every test process: r1's collectives read tensors their group serves
    tok = load_tokenizer(model)
    llm = RecordingLLM(tok, rank)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=5)
    got = {}

    def calls_of(run):
        before = len(llm.calls)
        result = run()
        return {"calls": llm.calls[before:], "groups": len(result)}

    engine = VLLMEngine(llm, tok, RolloutConfig(), torch.float32, torch.device("cpu"), lockstep=lockstep_group())
    # a model replica's leader generates; the other rank passes no prompts (r1cli/rl/loop.py, eval/accuracy.py)
    got["replica"] = calls_of(lambda: engine.generate([[1, 2, 3], [4, 5]] if rank == 0 else [], params))
    # held-out rows split 3 / 2 over the ranks, two prompts a vLLM call
    chunked = VLLMEngine(llm, tok, RolloutConfig(prompts_per_generate=2), torch.float32, torch.device("cpu"),
                         lockstep=lockstep_group())
    got["uneven"] = calls_of(lambda: chunked.generate([[7]] * (3 if rank == 0 else 2), params))
    # multi-turn tool rollouts: three turns on rank 0, one on rank 1
    settings = TurnSettings(("python",), max_turns=4, max_tokens=400)
    got["tools"] = calls_of(lambda: generate_with_tools(engine, tok, [tok("1+0=?")["input_ids"]], params, settings))
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(got, f)
    # the python tool's sandbox launchers are this process's children: a multiprocessing child's exit would join
    # them before their executor's own exit hook stops them (r1 itself runs in main processes)
    os._exit(0)


def test_vllm_data_parallel_ranks_enter_generate_equally_often(tmp_path, tiny_model):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tiny_model), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # each rank got exactly its own groups back
    assert [r0[k]["groups"] for k in ("replica", "uneven", "tools")] == [2, 3, 1]
    assert [r1[k]["groups"] for k in ("replica", "uneven", "tools")] == [0, 2, 1]
    # rank 0's work, and rank 1 entering vLLM as often with what it has (nothing, once done)
    assert r0["replica"]["calls"] == [2] and r1["replica"]["calls"] == [0]
    assert r0["uneven"]["calls"] == [2, 1] and r1["uneven"]["calls"] == [2, 0]
    later = TURNS_ON_RANK0 - 1  # continuations: one row per sample (2), none on rank 1
    assert r0["tools"]["calls"] == [1] + [2] * later and r1["tools"]["calls"] == [1] + [0] * later
