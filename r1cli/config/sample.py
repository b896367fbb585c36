"""filters and sample: r1 sample's rejection sampling and what a kept chain of thought must pass."""

from __future__ import annotations

from dataclasses import dataclass

from r1cli.config.fields import bounded


@dataclass
class FilterConfig:
    """Why a chain of thought that reached the right answer is still not trained on (r1 sample, r1 coldstart;
    DeepSeek-R1: mixed languages, long paragraphs and code blocks are filtered out). Each check is a switch."""

    require_format: bool = True  # strict <think>…</think><answer>…</answer>
    mixed_language: bool = True  # drop chains of thought below min_language_share in rewards.language
    # mixed_language: the least share of the reasoning in its main script
    min_language_share: float = bounded(0.95, 0.0, 1.0)
    code_blocks: bool = True  # drop ``` fences in the reasoning
    max_paragraph_chars: int = bounded(2000, 0)  # longest paragraph of the reasoning; 0: off
    max_response_tokens: int = bounded(0, 0)  # longer responses are dropped as over-long; 0: off


@dataclass
class SampleConfig:
    """r1 sample (rejection sampling): rollout.n samples per prompt, the verified-correct ones kept."""

    out: str = "runs/sample/samples.jsonl"  # SFT-ready rows (prompt, response); stats beside it
    keep_per_prompt: int = bounded(4, 1)  # correct, filtered samples kept per prompt at most
    prompts_per_batch: int = bounded(16, 1)  # prompts generated (and appended) together
    # a local model folder that judges prompts without a checkable answer (data.answer_field empty or
    # absent): it reads the question and the response and says whether the final answer is right.
    # "": such prompts are an error
    judge: str = ""
    judge_max_new_tokens: int = bounded(16, 1)  # tokens the answer judge (sample.judge) may write
