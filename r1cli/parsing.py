"""Reading a model's completion: its chain of thought, its one final answer, its boxed answers, a judge's yes, and
which pieces a tool wrote.

Plain text functions with no r1 imports: the rewards, the rejection-sampling filters, the judge, the data
preparation and r1 eval all read completions, so this sits below every one of them.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCED_OUTPUT = re.compile(r"(?<=```output)(\n.*?\n```\n?)", re.S)


def reasoning_of(text: str) -> str:
    """The chain of thought: inside <think>…</think>, else everything before <answer>."""
    m = _THINK.search(text)
    return m.group(1) if m else text.split("<answer>")[0]


def final_answer_of(text: str) -> str:
    """The text of the one <answer>…</answer>, stripped ('' when there is none, or more than one: a second answer
    block anywhere is no answer, as for every checker)."""
    found = _ANSWER.findall(text)
    return found[0].strip() if len(found) == 1 else ""


def all_boxed(text: str) -> list[str]:
    """The contents of every \\boxed{…} in text, braces balanced."""
    out, i = [], text.find("\\boxed{")
    while i >= 0:
        depth, start = 0, i + len("\\boxed{")
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                if depth == 0:
                    out.append(text[start:j])
                    break
                depth -= 1
        i = text.find("\\boxed{", i + 1)
    return out


def verdict(text: str) -> bool:
    """A judge's reply means yes: its first word is yes (any case, punctuation ignored)."""
    words = text.strip().split()
    return bool(words) and words[0].strip(".,:;!*\"'").lower() == "yes"


def fenced_observations(text: str) -> list[tuple[str, bool]]:
    """[(piece, is_tool_output)] of a response in the fenced tool format (r1cli.tools.formats): the output blocks'
    contents (what the tool wrote, and the fence that closes it) are the tool's, everything else the model's."""
    parts = _FENCED_OUTPUT.split(text)
    return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]
