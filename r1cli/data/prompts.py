"""Prompts as the policy sees them: rendered with the template, tokenised, and fitted to the context."""

from __future__ import annotations

from r1cli.config import DataConfig
from r1cli.data.records import Records
from r1cli.data.templates import prompt_messages, render_row_prompt
from r1cli.errors import R1Error


def encode_prompts(tokenizer, rows: Records, data: DataConfig) -> list[list[int]]:
    """Each row's prompt (its data.prompt_field, or a chat-style row's data.messages_field), rendered with
    data.template and data.prefill, as token ids."""
    for i in range(len(rows)):
        if prompt_messages(rows[i], data) is None:
            rows.value(i, data.prompt_field, "data.prompt_field")  # a row with neither: file:line names it
    texts = [render_row_prompt(tokenizer, rows[i], data) for i in range(len(rows))]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def fit_prompts(rows: Records, prompts: list[list[int]], limit: int, policy: str) -> tuple[Records, list, int]:
    """Rows whose prompt has at most `limit` tokens; the others are dropped (and counted) or, with
    policy "error", the first one is an error naming its line."""
    keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
    if len(keep) < len(rows) and policy == "error":
        i = next(i for i, p in enumerate(prompts) if len(p) > limit)
        raise R1Error(f"{rows.where(i)}: the prompt has {len(prompts[i])} tokens, more than {limit} "
                      "(data.max_prompt_tokens, or the model's context less rollout.max_new_tokens); "
                      "data.long_prompts=drop drops such rows")
    if not keep:
        raise R1Error(f"{rows.path}: every prompt is longer than {limit} tokens")
    return rows.__class__([rows[i] for i in keep], rows.path, [rows.lines[i] for i in keep]), \
        [prompts[i] for i in keep], len(rows) - len(keep)
