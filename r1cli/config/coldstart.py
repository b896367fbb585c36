"""coldstart: r1 coldstart's readable long chains of thought."""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.config.fields import bounded


@dataclass
class ColdstartConfig:
    """r1 coldstart (DeepSeek-R1 stage 1): long chains of thought in the readable format, then SFT on them."""

    out: str = "runs/coldstart/data.jsonl"  # SFT-ready rows; stats and the finished-prompt index beside it
    # a local model folder that writes the chains of thought by few-shot prompting with coldstart.exemplars;
    # "": the rows' own data.response_field (e.g. synthetic worked solutions) is post-processed and filtered
    generator: str = ""
    exemplars: str = ""  # JSONL of {prompt, response} long-CoT examples shown before each problem
    shots: int = bounded(2, 0)  # exemplars per prompt
    reflect: bool = False  # a second pass in which the generator re-checks its own answer before closing
    # what reflect appends before the generator's second pass
    reflect_prompt: str = "\n\nWait, let me verify this answer step by step."
    keep_per_prompt: int = bounded(1, 1)  # verified chains of thought kept per prompt
    prompts_per_batch: int = bounded(16, 1)  # prompts generated (and appended to coldstart.out) together
    # check final answers with the task's rule checker where the row has a ground truth (data.answer_field);
    # false keeps them unchecked, as a hand-written or noisy cold start would be (verified: none)
    verify: bool = True
    require_verified: bool = False  # drop rows without a ground-truth answer (they cannot be verified)
