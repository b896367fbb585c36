"""Prompt templates: the tokenizer's chat template, the paper's R1-Zero template, plain text.

`render_prompt` gives the text a model is asked to continue; `render_turns` splits
a conversation into (text, trainable) segments so that SFT puts loss only on the
assistant's tokens.
"""

from __future__ import annotations

from r1cli.config import DataConfig
from r1cli.errors import R1Error

# DeepSeek-R1 paper, Table 1, verbatim; {prompt} is replaced by the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)


def _messages(prompt: str, cfg: DataConfig) -> list[dict]:
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]


_TEMPLATE_FILES: dict[str, str] = {}


def _template_file(path: str) -> str:
    if path not in _TEMPLATE_FILES:
        from pathlib import Path

        if not Path(path).is_file():
            raise R1Error(f"data.chat_template: file not found: {path}")
        _TEMPLATE_FILES[path] = Path(path).read_text()
    return _TEMPLATE_FILES[path]


def template_source(cfg: DataConfig) -> str | None:
    """data.chat_template's text, or None for the tokenizer's own."""
    return _template_file(cfg.chat_template) if cfg.chat_template else None


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool, cfg: DataConfig | None = None) -> str:
    """The conversation through the chat template: data.chat_template's file when set, else the tokenizer's, with
    data.chat_template_kwargs as extra template variables (e.g. enable_thinking)."""
    own = template_source(cfg) if cfg is not None else None
    if own is None and not getattr(tokenizer, "chat_template", None):
        raise R1Error("the tokenizer has no chat template; use data.template=r1_zero or plain, or give one in "
                      "data.chat_template")
    kwargs = dict(cfg.chat_template_kwargs) if cfg is not None else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=own, **kwargs)
    except Exception as e:  # noqa: BLE001 - jinja's errors name the template line
        if own is None:
            raise
        raise R1Error(f"data.chat_template {cfg.chat_template}: {type(e).__name__}: {e}") from None


def render_prompt(tokenizer, prompt: str, cfg: DataConfig) -> str:
    """The text the policy continues, ending with data.prefill (e.g. '<think>') if set."""
    if cfg.template == "r1_zero":
        text = R1_ZERO_TEMPLATE.format(prompt=prompt)
    elif cfg.template == "r1_zero_chat":  # for instruct models: the same words, inside their chat format
        text = _chat(tokenizer, _messages(R1_ZERO_TEMPLATE.format(prompt=prompt), cfg), True, cfg)
    elif cfg.template == "plain":
        text = prompt
    else:
        text = _chat(tokenizer, _messages(prompt, cfg), True, cfg)
    return text + cfg.prefill


def prompt_messages(row: dict, cfg: DataConfig) -> list[dict] | None:
    """A chat-style row's prompt (data.messages_field): its conversation without the final assistant turn (that
    is the reference answer, not the prompt). None for a row with a data.prompt_field."""
    if cfg.prompt_field in row or not row.get(cfg.messages_field):
        return None
    msgs = row[cfg.messages_field]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise R1Error(f"field '{cfg.messages_field}' must be a list of {{role, content}} objects")
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not any(m["role"] == "user" for m in msgs):
        raise R1Error(f"field '{cfg.messages_field}' has no user message to prompt with")
    return msgs


def prompt_text(row: dict, cfg: DataConfig) -> str:
    """The question a row asks: its data.prompt_field, or a chat-style row's last user message."""
    msgs = prompt_messages(row, cfg)
    if msgs is None:
        return str(row[cfg.prompt_field])
    return str(next(m["content"] for m in reversed(msgs) if m["role"] == "user"))


def render_row_prompt(tokenizer, row: dict, cfg: DataConfig) -> str:
    """render_prompt for a row: a chat-style row's conversation goes through the chat template whole (system and
    earlier turns included); with another template, its last user message is the prompt."""
    msgs = prompt_messages(row, cfg)
    if msgs is None or cfg.template != "chat":
        return render_prompt(tokenizer, str(row[cfg.prompt_field]) if msgs is None else prompt_text(row, cfg), cfg)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt and \
        msgs[0]["role"] != "system" else []
    return _chat(tokenizer, system + msgs, True, cfg) + cfg.prefill


def render_turns(tokenizer, row_messages: list[dict], cfg: DataConfig) -> list[tuple[str, bool]]:
    """[(text, is_assistant)] whose concatenation is the whole rendered conversation.

    The chat template renders growing prefixes; each assistant turn is the text a
    prefix gained when that turn was added, so the loss mask follows the template
    exactly (including its end-of-turn tokens).
    """
    if cfg.template != "chat":
        # single turn: user prompt, then the assistant's response and end of text
        user = next((m["content"] for m in row_messages if m["role"] == "user"), None)
        reply = next((m["content"] for m in row_messages if m["role"] == "assistant"), None)
        if user is None or reply is None:
            raise R1Error("a conversation needs a user and an assistant message")
        prompt = render_prompt(tokenizer, user, cfg)
        reply = _strip_prefill(reply, cfg.prefill)
        sep = " " if cfg.template == "r1_zero" and not cfg.prefill else ""
        return [(prompt, False), (sep + reply + (tokenizer.eos_token or ""), True)]

    msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + list(row_messages)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _chat(tokenizer, msgs[:i], True, cfg) + cfg.prefill
        after = _chat(tokenizer, msgs[: i + 1], False, cfg)
        content = m["content"]
        if cfg.prefill and not content.startswith(cfg.prefill):
            after = _chat(tokenizer, msgs[:i] + [{**m, "content": cfg.prefill + content}], False, cfg)
        if not before.startswith(done) or not after.startswith(before):
            raise R1Error("the chat template does not render conversations prefix by prefix; "
                          "use single-turn rows or data.template=plain")
        segments.append((before[len(done):], False))
        segments.append((after[len(before):], True))
        done = after
    full = _chat(tokenizer, msgs, False, cfg)
    if full[len(done):]:
        segments.append((full[len(done):], False))
    if not any(t for t, _ in segments):
        raise R1Error("a conversation has no assistant message to train on")
    return segments


def _strip_prefill(reply: str, prefill: str) -> str:
    return reply[len(prefill):] if prefill and reply.startswith(prefill) else reply


def row_messages(row: dict, cfg: DataConfig) -> list[dict] | None:
    """A conversation from a row: its messages column, or prompt + response columns."""
    if cfg.messages_field in row and row[cfg.messages_field]:
        msgs = row[cfg.messages_field]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise R1Error(f"field '{cfg.messages_field}' must be a list of {{role, content}} objects")
        return msgs
    if cfg.prompt_field in row and cfg.response_field in row:
        return [{"role": "user", "content": str(row[cfg.prompt_field])},
                {"role": "assistant", "content": str(row[cfg.response_field])}]
    return None
