"""The step r1 sample and r1 coldstart share after generating: each candidate verified, filtered, deduplicated and
capped, and the survivors written as SFT rows of one schema."""

from __future__ import annotations

from collections import Counter

from r1cli.config import DataConfig, FilterConfig
from r1cli.data.templates import prompt_text
from r1cli.rewards import RewardContext
from r1cli.sample.filters import pick, rejection

# the one schema of generated SFT data (r1 sample, r1 coldstart): what `r1 sft` reads with the default data fields
ROW_KEYS = ("prompt", "response", "answer", "task", "verified", "sample")


def keep_candidates(row: dict, texts: list[str], n_tokens: list[int], verdicts: list[bool | None], verified: str,
                    data: DataConfig, filters: FilterConfig, ctx: RewardContext, keep: int, *,
                    wrong: str = "wrong answer", require_verified: bool = False) -> tuple[list[dict], Counter]:
    """One prompt's candidates -> (rows to store, rejection counts). A verdict of False is `wrong`, None (nothing to
    verify against) is kept unless `require_verified`; the rest pass the filters, then dedupe and the cap (`pick`).
    Kept + counted add up to len(texts)."""
    why = []
    for text, ok, n in zip(texts, verdicts, n_tokens):
        if ok is False:
            why.append(wrong)
        elif ok is None and require_verified:
            why.append("unverifiable")
        else:
            why.append(rejection(text, row, ctx, filters, n))
    chosen, reasons = pick(texts, why, keep)
    rows = [dict(zip(ROW_KEYS, (prompt_text(row, data), texts[j], row.get(data.answer_field), row.get(data.task_field),
                                verified, j))) for j in chosen]
    return rows, reasons
