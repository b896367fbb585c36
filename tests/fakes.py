"""A trainer backend, a rollout engine and a tokenizer written from r1cli/interfaces.py alone.

No model inside: the "policy" is one logit vector over a 130-token vocabulary (ASCII,
pad, eos), the same for every position. It is enough to drive the GRPO and SFT loops
through every seam (sampling params, token batches, the loss door, named weights,
save/load/export, the parallel context) and to watch them learn. The Megatron and
vLLM backends must pass the same loop tests.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from r1cli.backends.parallel import init_parallel
from r1cli.interfaces import ENGINES, TRAINERS, Completion, LossInput, SamplingParams, engine_factory
from r1cli.rewards import REWARDS

PAD, EOS, VOCAB = 128, 129, 130
INSTANCES: dict[str, object] = {}  # the last trainer and engine built, for tests to inspect


class FakeTokenizer:
    pad_token_id, eos_token_id = PAD, EOS
    pad_token, eos_token = "<pad>", "\x00"  # the eos text encodes as one character the policy never emits
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [EOS if c == "\x00" else ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i < 128)


def initial_logits() -> torch.Tensor:
    theta = torch.zeros(VOCAB)
    theta[PAD] = -30.0
    theta[EOS] = 2.0  # about one sample in eight stops early: some truncated, some not
    return theta


class FakeTrainer:
    """TrainerBackend: SGD on a unigram logit vector; gradients summed over the data-parallel group."""

    model_parallel = False
    loss_inputs = frozenset({LossInput.LOGPROBS})
    generation_model = None  # the engine below keeps its own copy, refreshed through named_weights()

    def __init__(self, model, train, optim, parallel, need_reference: bool = False):
        self.device = torch.device("cpu")
        self.parallel = init_parallel(self.device, parallel.tensor_parallel, parallel.pipeline_parallel,
                                      parallel.timeout_min)
        self.tokenizer = FakeTokenizer()
        self.theta = initial_logits()
        self.reference = self.theta.clone() if need_reference else None
        self.lr = optim.lr
        self.calls: list[dict] = []  # one record per train_step
        INSTANCES["trainer"] = self

    def _logp(self, theta, batch, temperature):
        _, _, _, targets = batch.tensors(PAD, "cpu")
        return torch.log_softmax(theta / temperature, -1)[targets]

    def logprobs(self, batch, which="policy", temperature=1.0):
        theta = self.theta if which == "policy" else self.reference
        if theta is None:
            raise RuntimeError("no reference")
        mask = batch.scored_mask()
        grid = torch.zeros_like(mask)
        grid[mask.bool()] = self._logp(theta, batch, temperature)
        return grid

    def train_step(self, batch, loss):
        theta = self.theta.clone().requires_grad_()
        logp = self._logp(theta, batch, loss.temperature)
        ent = None
        if loss.wants_entropy:
            p = torch.softmax(theta / loss.temperature, -1)
            ent = -(p * torch.log_softmax(theta / loss.temperature, -1)).sum().expand_as(logp)
        value, sums = loss(logp, ent, batch)
        (grad,) = torch.autograd.grad(value, theta)
        if self.parallel.distributed and self.parallel.dp_size > 1:
            torch.distributed.all_reduce(grad, group=self.parallel.dp_group)
        record = {"rows": len(batch), "fields": {k: v.clone() for k, v in batch.fields.items()},
                  "completions": [[t for t in row if t != -100] for row in batch.targets]}
        if "old_logp" in batch.fields:
            old = batch.fields["old_logp"][batch.scored_mask().bool()]
            record["max_log_ratio"] = float((logp.detach() - old).abs().max())
        self.calls.append(record)
        self.theta = self.theta - self.lr * grad
        out = {"grad_norm": float(grad.norm()), "lr": self.lr, "skipped": 0.0}
        out.update(loss.finish(self.parallel.reduce_metric_sums(sums)))
        return out

    def named_weights(self):
        yield "theta", self.theta

    def update_reference(self):
        if self.reference is not None:
            self.reference = self.theta.clone()

    def save(self, directory, extra):
        if self.parallel.is_main:
            torch.save({"theta": self.theta, "reference": self.reference, "extra": extra},
                       Path(directory) / "fake.pt")
        self.parallel.barrier()

    def load(self, directory):
        blob = torch.load(Path(directory) / "fake.pt")
        self.theta, self.reference = blob["theta"], blob["reference"]
        return blob["extra"]

    def export_hf(self, directory):
        if self.parallel.is_main:
            Path(directory).mkdir(parents=True, exist_ok=True)
            torch.save(self.theta, Path(directory) / "theta.pt")


class FakeEngine:
    """RolloutEngine: samples from its own copy of the logits, refreshed only through load_weights.

    With `menu` set, a completion's text is menu[first token % len(menu)]: a policy choosing among given texts."""

    menu: list[str] | None = None
    report_logprobs = False  # like vLLM: return its own log-prob of each sampled token
    skew = 0.0  # the engine's copy differs from the trainer's by skew * (token id % 3) (other kernels, bf16)
    stall_after: int | None = None  # generate calls that return before one that never does

    def __init__(self, record_dir: Path | None = None, rank: int = 0):
        self.theta = initial_logits()
        self.tok = FakeTokenizer()
        self.loads = 0
        self.record = None if record_dir is None else Path(record_dir) / f"prompts_rank{rank}.jsonl"
        INSTANCES["engine"] = self

    def generate(self, prompts, params: SamplingParams):
        self.calls = getattr(self, "calls", 0) + 1
        if self.stall_after is not None and self.calls > self.stall_after:
            time.sleep(3600)
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with self.record.open("a") as f:
                f.write(json.dumps(prompts) + "\n")
        probs = torch.softmax(self.theta / max(params.temperature, 1e-6), -1)
        out = []
        for i, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(params.seed + i)
            group = []
            for _ in range(params.n):
                ids = torch.multinomial(probs, params.max_tokens, replacement=True, generator=g).tolist()
                cut = ids.index(EOS) + 1 if EOS in ids else len(ids)
                ids = ids[:cut]
                text = self.menu[ids[0] % len(self.menu)] if self.menu else self.tok.decode(ids)
                lps = None
                if params.logprobs and self.report_logprobs:
                    logp = torch.log_softmax(self.theta / max(params.temperature, 1e-6), -1)
                    lps = [float(logp[t]) for t in ids]
                group.append(Completion(list(prompt), ids, text, "stop" if EOS in ids else "length", lps))
            out.append(group)
        return out

    def load_weights(self, weights):
        for name, t in weights:
            assert name == "theta", name
            self.theta = t.detach().clone() + self.skew * (torch.arange(len(t)) % 3).float()
        self.loads += 1

    def sleep(self):
        pass

    def wake(self):
        pass


@engine_factory(reports_logprobs=True)
def create_engine(model, rollout, trainer=None):
    """With FAKE_PROMPTS_DIR set, each rank appends the prompts it is asked for to a file there."""
    rank = trainer.parallel.rank if trainer is not None else 0
    engine = FakeEngine(os.environ.get("FAKE_PROMPTS_DIR"), rank)
    if trainer is not None:
        engine.load_weights(trainer.named_weights())
    return engine


def sevens(completion: str, row: dict, ctx) -> float:
    """Share of '7' characters: a reward the unigram policy can learn."""
    return completion.count("7") / max(1, len(completion))


def first_char_odd(completion: str, row: dict, ctx) -> float:
    """1 when the first character's code is odd: groups of a few samples are often all equal."""
    return float(bool(completion) and ord(completion[0]) % 2 == 1)


def register() -> None:
    TRAINERS.register("fake", FakeTrainer)
    ENGINES.register("fake", create_engine)
    REWARDS.register("sevens", sevens)
    REWARDS.register("first_char_odd", first_char_odd)


def unregister() -> None:
    TRAINERS.unregister("fake")
    ENGINES.unregister("fake")
    REWARDS.unregister("sevens")
    REWARDS.unregister("first_char_odd")
