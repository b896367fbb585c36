"""A model as the verifier for prompts without a checkable answer (DeepSeek-R1 stage 3 used DeepSeek-V3 as a
generative judge for such data): it reads the question and a response and says yes or no."""

from __future__ import annotations

from dataclasses import replace

from r1cli.config import Config
from r1cli.data.records import Records
from r1cli.data.templates import render_prompt
from r1cli.interfaces import SamplingParams, build_engine
from r1cli.models.loading import load_tokenizer
from r1cli.parsing import final_answer_of, reasoning_of, verdict

JUDGE_PROMPT = ("You check answers. Question:\n{question}\n\nA student's reasoning:\n{reasoning}\n\n"
                "The student's final answer: {answer}\n\nIs the final answer correct? Reply with one word, yes or no.")


class AnswerJudge:
    """`judge(question, responses)` -> one bool per response; greedy, one generate call for all of them."""

    def __init__(self, engine, tokenizer, data_cfg, max_new_tokens: int = 16):
        self.engine, self.tokenizer, self.max_new_tokens = engine, tokenizer, max_new_tokens
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        self.data_cfg = replace(data_cfg, template=template, prefill="", system_prompt="")

    @classmethod
    def from_config(cls, cfg: Config) -> "AnswerJudge":
        model = replace(cfg.model, path=cfg.sample.judge)
        engine = build_engine(model, replace(cfg.rollout, n=1, temperature=0.0))
        return cls(engine, load_tokenizer(model.path), cfg.data, cfg.sample.judge_max_new_tokens)

    def __call__(self, question: str, responses: list[str]) -> list[bool]:
        texts = [render_prompt(self.tokenizer, JUDGE_PROMPT.format(
            question=question, reasoning=reasoning_of(r).strip(), answer=final_answer_of(r)), self.data_cfg)
            for r in responses]
        prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        params = SamplingParams(n=1, temperature=0.0, max_tokens=self.max_new_tokens, stop=("\n",))
        return [verdict(group[0].text) for group in self.engine.generate(prompts, params)]


def needs_judge(rows: Records, answer_field: str) -> list[int]:
    """Rows whose answer field is missing or empty."""
    return [i for i in range(len(rows)) if rows[i].get(answer_field) in (None, "")]
