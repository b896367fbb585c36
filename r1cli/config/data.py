"""data: the training and evaluation rows, and how they become prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from r1cli.config.fields import bounded


@dataclass
class DataConfig:
    # JSONL, Parquet, Arrow, a folder of them, or a datasets save_to_disk folder (local paths)
    train: str = ""
    eval: str = ""  # held-out set (same formats), optional
    # source column -> the name r1 reads, applied as rows are read: {problem: prompt, solution: response}
    columns: dict[str, str] = field(default_factory=dict)
    prompt_field: str = "prompt"  # the column holding the prompt
    response_field: str = "response"  # the column holding the worked response (SFT, cold start)
    answer_field: str = "answer"  # the column holding the ground truth the checkers compare with
    messages_field: str = "messages"  # the column holding a chat conversation (SFT rows as messages)
    task_field: str = "task"  # which checker verifies a row (math, arithmetic, countdown)
    # r1_zero_chat: the paper's template as the user turn of the chat template
    template: Literal["chat", "r1_zero", "r1_zero_chat", "plain"] = "chat"
    system_prompt: str = ""  # a system turn put before every prompt (chat templates)
    prefill: str = ""  # text the assistant turn starts with, e.g. "<think>"
    # extra variables for the tokenizer's chat template, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str = ""  # a Jinja chat template file of your own, used instead of the tokenizer's
    max_seq_len: int = bounded(1024, 1)  # SFT rows (and packed rows) are cut at this many tokens
    pack: bool = True  # SFT: samples laid back to back into rows of max_seq_len, attention kept within each sample
    # SFT: a tool's output inside a response (the contents of ```output blocks, as rollout.tools writes them) is
    # context, not a target, as in RL
    mask_tool_output: bool = True
    shuffle: bool = True  # the training rows in a seeded random order every epoch
    max_samples: int = bounded(0, 0)  # 0: all
    max_line_mb: int = bounded(64, 1)  # longest JSONL line read
    # RL prompts longer than this many tokens (0: the model's context less rollout.max_new_tokens) are
    # dropped and counted, or with long_prompts=error the first is an error
    max_prompt_tokens: int = bounded(0, 0)
    # what happens to a prompt over max_prompt_tokens: drop it (counted) or stop with an error
    long_prompts: Literal["drop", "error"] = "drop"
