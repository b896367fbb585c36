"""Multi-turn rollouts with tools: the GRPO step on interleaved samples, and hostile calls during a run."""

import json

import fakes
import pytest
import torch
from test_protocols import fake_config, prompts, registered  # noqa: F401  (fixtures)

from r1cli.config import load_config
from r1cli.interfaces import ENGINES, Completion, build_trainer, engine_factory
from r1cli.rl.loop import run_rl
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.run.metrics import read_metrics
from r1cli.token_batch import TokenBatch


def test_a_multi_turn_step_is_the_hand_computed_objective_with_the_observations_masked(tiny_model, tmp_path):
    """Rows of model tokens with tool output in between: the trainer's loss and gradient norm are those of the
    clipped objective over the model's tokens alone, computed here from transformers' logits of the whole
    interleaved sequence; counting the observation tokens would give another loss."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [f"model.path={tiny_model}", "train.device=cpu", "train.kernels=torch", "optim.lr=0",
                             "optim.grad_clip=0", f"train.output_dir={tmp_path}"])
    trainer = build_trainer(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompts_ = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in range(3)]
    completions = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 9, 15)]
    observation = [[3 <= j < 7 for j in range(12)], [False] * 9, [j >= 10 for j in range(15)]]  # tool output spans
    batch = TokenBatch.from_completions(prompts_, completions, observation)
    mask = batch.scored_mask()
    assert mask.sum(-1).tolist() == [8, 9, 10]
    adv = torch.tensor([1.0, -0.5, 0.7])
    old = trainer.logprobs(batch) - 0.3 * torch.tensor([1.0, -1.0, 1.0])[:, None] * mask
    batch.fields.update(old_logp=old, advantages=adv, loss_weight=torch.ones(3), mask=mask)
    out = trainer.train_step(batch, GRPOLoss(GRPOObjective(), 3, float(mask.sum())))

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    def hand(count_observations: bool):
        total = 0.0
        for b, (p, c, o) in enumerate(zip(prompts_, completions, observation)):
            logits = model(torch.tensor([p + c])).logits[0].float()
            logp = torch.log_softmax(logits[len(p) - 1: -1], -1).gather(1, torch.tensor(c)[:, None])[:, 0]
            keep = torch.tensor([count_observations or not x for x in o])
            old_b = torch.zeros(len(c))
            old_b[~torch.tensor(o)] = old[b, : int((~torch.tensor(o)).sum())]
            ratio = torch.exp(logp - old_b.where(~torch.tensor(o), logp.detach()))
            pg = -torch.minimum(ratio * adv[b], ratio.clamp(0.8, 1.2) * adv[b])
            total = total + pg[keep].mean() / 3
        return total

    loss = hand(False)
    loss.backward()
    norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in model.parameters() if q.grad is not None))
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-3)
    assert abs(hand(True).item() - out["loss"]) > 1e-3  # the masking is what makes them equal


HOSTILE = {0: "while True: pass", 1: "import os\nwhile True: os.fork()", 2: "print('7' * 50_000_000)",
           3: "print(7 * 111)"}


@engine_factory(reports_logprobs=False)
def scripted_engine(model, rollout, trainer=None):
    """Sample j of every prompt makes call HOSTILE[j % 4] in its first turn, then answers with what it read."""
    tok = fakes.FakeTokenizer()

    class Engine:
        def load_weights(self, weights):
            list(weights)

        def sleep(self):
            pass

        def generate(self, batch_prompts, params):
            out = []
            for p in batch_prompts:
                context = tok.decode(p)
                group = []
                for j in range(params.n):
                    if "```output" not in context:
                        text = f"```python\n{HOSTILE[j % 4]}\n```\n```output"
                    else:
                        text = "answer " + context.rsplit("```output\n", 1)[1].split("\n")[0][:20]
                    ids = tok(text)["input_ids"]
                    group.append(Completion(list(p), ids, tok.decode(ids), "stop"))
                out.append(group)
            return out

    return Engine()


def test_hostile_tool_calls_during_a_run_cost_only_their_sample(prompts, tmp_path, monkeypatch):  # noqa: F811
    """A loop, a fork bomb and an output flood in three of every four samples: each is an error observation for its
    own sample (the sandbox stops it), the run goes on, and the benign call's output reaches its sample."""
    ENGINES.register("scripted", scripted_engine)
    try:
        run_rl(fake_config(prompts, tmp_path / "run", "rollout.engine=scripted", "rollout.tools=[python]",
                           "rollout.tool_timeout_s=2", "rollout.tool_output_chars=80", "rollout.max_new_tokens=60",
                           "rollout.max_total_tokens=300",
                           "grpo.prompts_per_step=2", "train.steps=2", "logging.sample_every=1"))
    finally:
        ENGINES.unregister("scripted")
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "tools/calls" in m]
    assert len(steps) == 2
    for m in steps:  # 2 prompts x 4 samples a step: every sample one call, three of the four fail
        assert m["tools/turns"] == 2 and m["tools/calls"] == 1 and m["tools/errors"] == 6
    table = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    texts = [r["completion"] for r in table if r["step"] == 1]
    assert len(texts) == 8 and sum(t.endswith("answer 777") for t in texts) == 2  # the benign calls' samples
    assert all("```output\n" in t and t.count("```python") == 1 for t in texts)  # each shows its turns
    from r1cli.run.report import write_report

    page = write_report(str(tmp_path / "run")).read_text()
    assert "tool use (share of samples)" in page and "turns and tool calls per sample" in page


@engine_factory(reports_logprobs=False)
def adding_engine(model, rollout, trainer=None):
    """Reads a+b from the prompt, asks the python tool for the sum, answers with the tool's output."""
    import re

    from r1cli.models.loading import load_tokenizer

    tok = load_tokenizer(model.path)

    class Engine:
        def generate(self, batch_prompts, params):
            out = []
            for p in batch_prompts:
                context = tok.decode(p)
                if "```output" in context:
                    text = "<answer>" + context.rsplit("```output\n", 1)[1].split("\n")[0] + "</answer>"
                else:
                    a, b = re.findall(r"(\d+)\s*\+\s*(\d+)", context)[-1]
                    text = f"<think>the tool adds</think>```python\nprint({a} + {b})\n```\n```output"
                ids = tok(text, add_special_tokens=False)["input_ids"]
                out.append([Completion(list(p), ids, text, "stop")] * params.n)
            return out

    return Engine()


def test_r1_eval_with_tools_scores_the_answers_the_tool_computed(tiny_model, arith_data, tmp_path):
    """The same scripted model under `r1 eval`: with rollout.tools=[python] (--tools python) it reads the sum the
    sandbox printed and answers it; without tools its turn ends at the call and nothing is answered."""
    from r1cli.config import RolloutConfig
    from r1cli.eval.run import EvalRequest, run_eval

    ENGINES.register("adding", adding_engine)
    try:
        scores = {}
        for name, rollout in (("tools", RolloutConfig(tools=["python"])), ("none", RolloutConfig())):
            req = EvalRequest((f"jsonl={arith_data[1]}",), str(tmp_path / name), model=str(tiny_model), samples=1,
                              limit=5, engine="adding", rollout=rollout)
            scores[name] = run_eval(req)["jsonl"]["pass@1"]["value"]
    finally:
        ENGINES.unregister("adding")
    assert scores == {"tools": 1.0, "none": 0.0}
