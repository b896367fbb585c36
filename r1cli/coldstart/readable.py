"""Cold-start data in the readable format (DeepSeek-R1 stage 1): the reasoning, then a summary that states the
final answer, in the project's tags -- `<think>reasoning</think><answer>summary</answer>` -- and the few-shot
prompts that ask a generator for it."""

from __future__ import annotations

import re
from dataclasses import replace

from r1cli.config import DataConfig
from r1cli.data.templates import render_prompt
from r1cli.parsing import final_answer_of

_THINK = re.compile(r"<think>(.*?)(?:</think>|<answer>|$)", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_FINAL = re.compile(r"(?:final answer|the answer is)\s*[:：]?\s*(.+?)\s*(?:$|\n)", re.IGNORECASE)


def _tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row, no blank edges."""
    text = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return re.sub(r"\n{3,}", "\n\n", text)


def readable(text: str) -> str:
    """A generation (or a worked solution) rewritten as <think>reasoning</think><answer>final</answer>.

    The reasoning is the <think> section (or everything before the answer); the final answer is the one
    <answer> section, else the last \\boxed{} of the reasoning, else a closing "final answer: X" line. Two
    <answer> sections are a hedge, not an answer. Without one the answer section is left empty, and the filters
    drop the sample as having no final answer.
    """
    answer = final_answer_of(text)
    m = _THINK.search(text)
    reasoning = m.group(1) if m else text.split("<answer>")[0]
    if not answer:
        boxed = _BOXED.findall(reasoning)
        final = _FINAL.findall(reasoning)
        answer = f"\\boxed{{{boxed[-1]}}}" if boxed else (final[-1].rstrip(".") if final else "")
    reasoning = re.sub(r"</?(?:think|answer)>", "", reasoning)
    return f"<think>{_tidy(reasoning)}</think><answer>{answer.strip()}</answer>"


def few_shot_prompt(tokenizer, exemplars: list[dict], prompt: str, cfg: DataConfig, field=("prompt", "response"),
                    ) -> str:
    """The problem after worked exemplars: earlier chat turns (data.template=chat), or Problem/Solution text."""
    q, a = field
    if cfg.template == "chat" and getattr(tokenizer, "chat_template", None):
        turns = [m for ex in exemplars for m in ({"role": "user", "content": str(ex[q])},
                                                 {"role": "assistant", "content": str(ex[a])})]
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + turns + \
            [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + cfg.prefill
    shots = "".join(f"Problem: {ex[q]}\nSolution: {ex[a]}\n\n" for ex in exemplars)
    return shots + render_prompt(tokenizer, f"Problem: {prompt}\nSolution: ", replace(cfg, template="plain"))


def draft_before_answer(text: str) -> str:
    """The reasoning part of a draft, cut before it closes (</think>) or answers (<answer>)."""
    for mark in ("</think>", "<answer>"):
        if mark in text:
            return text.split(mark, 1)[0]
    return text
