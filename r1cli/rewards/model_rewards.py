"""Rewards no rule can check: a reward model and a generative judge (DeepSeek-R1's fourth stage scores helpfulness
and harmlessness with a reward model; its third used a generative judge).

`reward_model` (rewards.model): a local Hugging Face sequence-classification model reads the conversation (the
row's prompt, then the response) through its chat template and its first logit is the reward; batched, on this
process's accelerator, moved to host memory between uses on a GPU (rewards.model.offload).

`judge` (rewards.judge): a local generative model, built through the rollout engine registry, answers a template
about each response; its reply is a verdict (yes -> 1) or a score (the first number / max_score). Verdicts are
cached per (prompt, response), so a repeated sample costs nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from r1cli.parsing import final_answer_of, reasoning_of, verdict

from .scoring import RewardContext, reward

_MODELS: dict[tuple[str, str], object] = {}  # (kind, path) -> the loaded scorer (one per process)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _conversation(tokenizer, question: str, response: str, max_tokens: int) -> list[int]:
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    else:
        text = f"{question}\n\n{response}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:]


class RewardModel:
    def __init__(self, cfg):
        import torch
        from transformers import AutoModelForSequenceClassification

        from r1cli.errors import R1Error
        from r1cli.models.loading import check_model_folder, load_tokenizer, quiet_transformers

        quiet_transformers()
        check_model_folder(cfg.path)
        self.cfg, self.device = cfg, _device()
        self.tokenizer = load_tokenizer(cfg.path)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.path, local_files_only=True,
                                                                        dtype=dtype).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if getattr(self.model.config, "num_labels", 1) < 1:
            raise R1Error(f"rewards.model.path {cfg.path}: the model has no output to read as a reward")
        self.offloaded = True  # loaded in host memory

    def __call__(self, questions: list[str], responses: list[str]) -> list[float]:
        import torch

        if self.offloaded and self.device.type != "cpu":
            self.model.to(self.device)
        self.offloaded = False
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(responses), self.cfg.batch_size):
                seqs = [_conversation(self.tokenizer, q, r, self.cfg.max_tokens)
                        for q, r in zip(questions[s: s + self.cfg.batch_size], responses[s: s + self.cfg.batch_size])]
                width = max(len(x) for x in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                att = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, x in enumerate(seqs):  # right padding: the model reads its score at the last real token
                    ids[i, : len(x)] = torch.tensor(x)
                    att[i, : len(x)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
                out += logits[:, 0].float().cpu().tolist()
        if self.cfg.offload and self.device.type != "cpu":
            self.model.to("cpu")
            self.offloaded = True
        return out


def _normalise(values: list[float], how: str) -> list[float]:
    import math

    if how == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in values]
    if how == "batch" and len(values) > 1:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return [(v - mean) / (std + 1e-6) for v in values]
    return values


def _questions(rows: list[dict], ctx: RewardContext) -> list[str]:
    from r1cli.config import DataConfig
    from r1cli.data.templates import prompt_text

    data = ctx.data or DataConfig()
    return [prompt_text(row, data) for row in rows]


@reward("reward_model", batch=True)
def reward_model(completions: list[str], rows: list[dict], ctx: RewardContext) -> list[float]:
    """rewards.model's first logit for each (prompt, response), normalised as rewards.model.normalize says."""
    cfg = ctx.rewards.model
    scorer = _MODELS.get(("rm", cfg.path))
    if scorer is None:
        scorer = _MODELS[("rm", cfg.path)] = RewardModel(cfg)
    return _normalise(scorer(_questions(rows, ctx), [ctx.full(c) for c in completions]), cfg.normalize)


JUDGE_TEMPLATE = ("You grade answers. Question:\n{question}\n\nA response:\n{response}\n\n"
                  "Is the response correct and helpful? Reply with one word, yes or no.")


class Judge:
    def __init__(self, cfg, rollout):
        from pathlib import Path

        from r1cli.config import DataConfig, ModelConfig
        from r1cli.errors import R1Error
        from r1cli.interfaces import build_engine
        from r1cli.models.loading import load_tokenizer

        self.cfg = cfg
        if cfg.template:
            if not Path(cfg.template).is_file():
                raise R1Error(f"rewards.judge.template: file not found: {cfg.template}")
            self.template = Path(cfg.template).read_text()
        else:
            self.template = JUDGE_TEMPLATE
        self.tokenizer = load_tokenizer(cfg.path)
        self.engine = build_engine(ModelConfig(path=cfg.path), replace(rollout, engine=cfg.engine, n=1,
                                                                      temperature=0.0))
        template = "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"
        self.data = DataConfig(template=template)
        self.cache: dict[tuple[str, str], float] = {}

    def parse(self, reply: str) -> float:
        if self.cfg.verdict == "score":
            m = re.search(r"-?\d+(?:\.\d+)?", reply)
            return max(0.0, min(1.0, float(m.group()) / self.cfg.max_score)) if m else 0.0
        return float(verdict(reply))

    def __call__(self, questions: list[str], responses: list[str], references: list[str]) -> list[float]:
        from r1cli.data.templates import render_prompt
        from r1cli.interfaces import SamplingParams

        todo = sorted({(q, r, ref) for q, r, ref in zip(questions, responses, references)
                       if (q, r) not in self.cache})
        # an engine whose ranks step together (vLLM data parallel) is called on every rank, with or without work
        if todo or hasattr(self.engine, "any_rank"):
            texts = [render_prompt(self.tokenizer, self.template.format(
                question=q, response=r, reasoning=reasoning_of(r).strip(), answer=final_answer_of(r),
                reference=ref), self.data) for q, r, ref in todo]
            prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            params = SamplingParams(n=1, temperature=0.0, max_tokens=self.cfg.max_new_tokens, stop=("\n",))
            for (q, r, _), group in zip(todo, self.engine.generate(prompts, params)):
                self.cache[(q, r)] = self.parse(group[0].text)
        return [self.cache[(q, r)] for q, r in zip(questions, responses)]


@reward("judge", batch=True)
def judge(completions: list[str], rows: list[dict], ctx: RewardContext) -> list[float]:
    """rewards.judge's verdict (1 / 0) or score (0-1) for each (prompt, response)."""
    from r1cli.config import RolloutConfig

    cfg = ctx.rewards.judge
    scorer = _MODELS.get(("judge", cfg.path))
    if scorer is None:
        scorer = _MODELS[("judge", cfg.path)] = Judge(cfg, RolloutConfig())
    refs = [str(row.get(ctx.answer_field, "")) for row in rows]
    return scorer(_questions(rows, ctx), [ctx.full(c) for c in completions], refs)
