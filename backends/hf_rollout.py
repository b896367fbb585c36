"""Rollouts with transformers `generate`: batched, KV cache, temperature / top-p / stop strings.

Colocated with the torch trainer: it samples from the trainer's own module, so
"loading new weights" after a step costs nothing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from r1cli.config import RolloutConfig

from .base import Completion


class HFGenerateEngine:
    def __init__(self, model, tokenizer, cfg: RolloutConfig, device: torch.device, own_copy: bool = False):
        self.model, self.tok, self.cfg, self.device = model, tokenizer, cfg, device
        self.own_copy = own_copy
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def load_weights(self, trainer) -> None:
        """A colocated engine samples from the trainer's live module; a copy is refreshed from it."""
        if self.own_copy:
            self.model.load_state_dict(trainer.full_state_dict())

    def _cut(self, ids: list[int], stops: list[str]) -> tuple[list[int], bool]:
        """Trim a generated row at EOS (kept) or at the end of the first stop string; flag truncation."""
        eos = self.tok.eos_token_id
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        if stops:
            dec = lambda k: self.tok.decode(ids[:k], skip_special_tokens=False)  # noqa: E731
            if any(st in dec(end) for st in stops):
                k = end  # walk back to the shortest prefix that still holds a stop string
                while k > 1 and any(st in dec(k - 1) for st in stops):
                    k -= 1
                return ids[:k], False
        finished = eos in ids[:end]
        return ids[:end], not finished

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, seeds: list[int], *, temperature: float | None = None,
                 max_new_tokens: int | None = None) -> list[list[Completion]]:
        """n completions for each prompt; prompts are batched `prompts_per_generate` at a time and each
        batch is seeded from its first prompt's seed, so results do not depend on how prompts are sharded
        when prompts_per_generate == 1."""
        temperature = self.cfg.temperature if temperature is None else temperature
        max_new = max_new_tokens or self.cfg.max_new_tokens
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        step = max(1, self.cfg.prompts_per_generate)
        for s in range(0, len(prompts), step):
            chunk = prompts[s: s + step]
            enc = self.tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            torch.manual_seed(seeds[s])
            kw = dict(do_sample=True, temperature=temperature, top_p=self.cfg.top_p, top_k=0) if temperature > 0 \
                else dict(do_sample=False)
            with self.autocast:
                seqs = self.model.generate(
                    input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                    max_new_tokens=max_new, num_return_sequences=n, use_cache=True,
                    stop_strings=self.cfg.stop or None, tokenizer=self.tok,
                    pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id, **kw,
                )
            width = enc["input_ids"].shape[1]
            for i, prompt in enumerate(chunk):
                p_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
                group = []
                for j in range(n):
                    gen = seqs[i * n + j, width:].tolist()
                    ids, truncated = self._cut(gen, self.cfg.stop)
                    truncated = truncated and len(ids) >= max_new
                    group.append(Completion(p_ids, ids, self.tok.decode(ids, skip_special_tokens=True), truncated))
                out.append(group)
        if was_training:
            self.model.train()
        return out


def hf_engine_for(trainer, cfg) -> HFGenerateEngine:
    """Share the trainer's module when it is whole; with sharded parameters keep an unsharded copy,
    so that each rank can generate on its own (ranks stop at different lengths)."""
    model = trainer.generation_model
    if model is not None:
        return HFGenerateEngine(model, trainer.tokenizer, cfg.rollout, trainer.device)
    from r1cli.models import load_model

    engine = HFGenerateEngine(load_model(cfg.model, trainer.device).eval(), trainer.tokenizer, cfg.rollout,
                              trainer.device, own_copy=True)
    engine.load_weights(trainer)
    return engine
