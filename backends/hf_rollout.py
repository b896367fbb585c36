"""Rollouts with transformers `generate`: batched, KV cache, temperature / top-p / top-k / stop strings.

Colocated with the torch trainer it samples from the trainer's own module, so new
weights after a step cost nothing; otherwise (sharded trainer, or `r1 eval` /
`r1 sample` without a trainer) it holds its own copy, refreshed by load_weights.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace
from typing import Iterable

import torch

from r1cli.config import ModelConfig, RolloutConfig
from r1cli.interfaces import Completion, SamplingParams, engine_factory
from r1cli.models.loading import autocast, frozen_dtype, load_model, load_tokenizer, resolve_device
from r1cli.models.routing_replay import per_sequence, routing_hooks
from r1cli.run.memory_plan import check_generation_fits


class GumbelSample:
    """A draw from softmax(scores) as argmax(scores + Gumbel noise) - the same distribution as transformers'
    multinomial sampling, cheaper on a CPU, and from a generator of the call's own (no global seed, so
    a generation thread beside the trainer leaves the trainer's random state alone)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand(scores.shape, generator=self.generator, device=scores.device).clamp_(min=1e-20)
        return scores.float() - torch.log(-torch.log(u))


class StepLogprobs:
    """Each sampled token's log-prob at the sampling temperature, from the logits generate itself computed (as vLLM
    reports them): the first processor keeps each step's log-softmax and reads the token drawn from it at the next
    step (the last one from the finished sequences)."""

    def __init__(self, temperature: float):
        self.temperature = temperature or 1.0
        self.prev: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.taken.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1).cpu())
        self.prev = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def finish(self, seqs: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] once generate returned its sequences."""
        if self.prev is not None:
            self.taken.append(self.prev.gather(-1, seqs[:, -1:]).squeeze(-1).cpu())
        return torch.stack(self.taken, 1)


def sampler(params: SamplingParams, generator: torch.Generator, first=()):
    """Temperature, top-k and top-p as transformers applies them, then the Gumbel draw; generate runs greedy over
    the result. `first`: processors that see the raw logits before them."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    steps = [*first, TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        steps.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        steps.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*steps, GumbelSample(generator)])


class HFGenerateEngine:
    def __init__(self, model, tokenizer, cfg: RolloutConfig, device: torch.device, dtype: str = "auto",
                 shared: bool = False, own_logprobs: bool = False, routing: str = "off"):
        self.model, self.tok, self.cfg, self.device = model, tokenizer, cfg, device
        # model.routing_replay: the experts of every token and the log-probs come from the generation itself
        self.routing = routing_hooks(model) if routing != "off" else None
        self.shared = shared  # the trainer's live module: its weights are always current
        # report each sampled token's log-prob under this engine's weights (when params.logprobs asks): an
        # asynchronous run's behaviour policy, one update behind the trainer
        self.own_logprobs = own_logprobs
        self.autocast = autocast(dtype, device)
        self.offloaded = False  # asleep: the own copy is in host memory

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF checkpoint name, tensor) pairs into the engine's own copy, in place (a mixture of experts'
        per-expert tensors into its fused ones); a shared module needs nothing."""
        if self.shared:
            return
        from r1cli.models.weight_names import load_checkpoint_named

        load_checkpoint_named(self.model, weights)

    def sleep(self) -> None:
        """An own copy on an accelerator goes to host memory while the trainer runs (a sharded trainer's step
        needs that memory; load_weights then copies into the host copy); the trainer's shared module stays."""
        if not self.shared and self.device.type != "cpu" and not self.offloaded:
            self.model.to("cpu")
            self.offloaded = True

    def wake(self) -> None:
        if self.offloaded:
            self.model.to(self.device)
            self.offloaded = False

    def _cut(self, ids: list[int], stops: tuple[str, ...]) -> tuple[list[int], bool]:
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

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            att[i, width - len(p):] = 1
        return ids.to(self.device), att.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """params.n completions for each token-id prompt; prompts are batched `prompts_per_generate` at a time
        and each batch is seeded from its first prompt's seed (params.seed + its index), so results do not
        depend on how prompts are sharded when prompts_per_generate == 1."""
        self.wake()
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        n = params.n
        step = self.prompts_per_call(prompts, n, params.max_tokens, params.rows_per_call)
        for s in range(0, len(prompts), step):
            chunk = prompts[s: s + step]
            width = max(len(p) for p in chunk)
            elem = next(self.model.parameters()).element_size()  # the cache is in the compute dtype (bf16 on a GPU)
            check_generation_fits(self.model.config, len(chunk), n, width + params.max_tokens,
                                  min(elem, 2) if self.device.type == "cuda" else elem, self.device)
            ids, att = (t.repeat_interleave(n, dim=0) for t in self._left_pad(chunk))  # row i * n + j: sample j of i
            kw = dict(do_sample=False)  # greedy, or sampling as the argmax of Gumbel-perturbed scores
            steps = StepLogprobs(params.temperature) if self.routing is not None else None
            first = () if steps is None else (steps,)
            if params.temperature > 0:
                kw["logits_processor"] = sampler(params, torch.Generator(self.device).manual_seed(params.seed + s),
                                                 first)
            elif first:
                from transformers import LogitsProcessorList

                kw["logits_processor"] = LogitsProcessorList(first)
            with self.autocast, self.routing.record() if self.routing is not None else nullcontext():
                seqs = self.model.generate(
                    input_ids=ids, attention_mask=att, max_new_tokens=params.max_tokens, use_cache=True,
                    stop_strings=list(params.stop) or None, tokenizer=self.tok,
                    pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id, **kw,
                )
            width = ids.shape[1]
            cut = [[self._cut(seqs[i * n + j, width:].tolist(), params.stop) for j in range(n)]
                   for i in range(len(chunk))]
            routes = logps = None
            if self.routing is not None:
                starts = [width - len(p) for p in chunk for _ in range(n)]
                lengths = [len(p) + len(c) for p, row in zip(chunk, cut) for c, _ in row]
                routes = per_sequence(self.routing.recorded, len(starts), starts, lengths)
                logps = steps.finish(seqs).tolist()
            for i, p_ids in enumerate(chunk):
                group = []
                for j, (c_ids, truncated) in enumerate(cut[i]):
                    truncated = truncated and len(c_ids) >= params.max_tokens
                    c = Completion(list(p_ids), c_ids, self.tok.decode(c_ids, skip_special_tokens=True),
                                   "length" if truncated else "stop")
                    if routes is not None:
                        c.routing, c.logprobs = routes[i * n + j], logps[i * n + j][: len(c_ids)]
                    group.append(c)
                out.append(group)
        if self.own_logprobs and params.logprobs and self.routing is None:
            self._score(out, params.temperature or 1.0, step * n)
        if was_training:
            self.model.train()
        return out

    def prompts_per_call(self, prompts: list[list[int]], n: int, max_tokens: int, rows: int = 0) -> int:
        """rollout.tokens_per_generate: as many prompts as keep n x (longest prompt + max_tokens) tokens within the
        budget (at least one); else `rows` rows (SamplingParams.rows_per_call) when given; else
        rollout.prompts_per_generate (0: 8). The same for the whole call, so the per-call seeds are a function of the
        config and the prompts."""
        budget = self.cfg.tokens_per_generate
        if budget and prompts:
            return max(1, budget // (n * (max(len(p) for p in prompts) + max_tokens)))
        if rows:
            return max(1, rows // n)
        return self.cfg.prompts_per_generate or 8

    def _score(self, groups: list[list[Completion]], temperature: float, rows: int) -> None:
        """Fill each completion's log-probs: teacher-forced forwards of this engine's weights over `rows` sequences at a
        time (as many as a generate call held), at the sampling temperature, through the trainer's kernels (so that
        on the same weights the two agree to rounding)."""
        from r1cli.kernels import ops as kernels
        from r1cli.token_batch import TokenBatch

        from .torch_trainer import HiddenLoss

        flat = [c for g in groups for c in g]
        batch = TokenBatch.from_completions([c.prompt_ids for c in flat], [c.completion_ids for c in flat])
        module, impl = HiddenLoss(self.model), kernels.pick_impl("auto", self.device)
        for s in range(0, len(flat), rows):
            ids, pos, idx, tgt = batch.select(list(range(s, min(len(flat), s + rows)))).tensors(
                self.tok.pad_token_id, self.device)
            with self.autocast:
                logp = module(ids, pos, idx, lambda h, w: kernels.fused_linear_logprobs(
                    h, w, tgt, temperature=temperature, impl=impl)[0])
            values, k = logp.float().cpu().tolist(), 0
            for c in flat[s: s + rows]:
                c.logprobs = values[k: k + len(c.completion_ids)]
                k += len(c.completion_ids)


@engine_factory(reports_logprobs=False)
def create_engine(model: ModelConfig, rollout: RolloutConfig, trainer=None) -> HFGenerateEngine:
    """Share a colocated trainer's module when it is whole in this process; with sharded parameters (or no
    trainer) hold an own copy, so that each rank can generate on its own (ranks stop at different lengths)."""
    # an asynchronous run generates while the trainer updates: the engine holds its own copy, one update behind
    shared = None if trainer is None or rollout.asynchronous else trainer.generation_model
    if shared is not None:
        return HFGenerateEngine(shared, trainer.tokenizer, rollout, trainer.device, model.dtype, shared=True,
                                routing=model.routing_replay)
    if trainer is not None:
        device = trainer.device
    else:  # one process per GPU under torchrun
        device = resolve_device("auto")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    tok = trainer.tokenizer if trainer is not None else load_tokenizer(model.path)
    # its own copy only generates: held in the compute dtype (bf16 on a GPU under mixed precision)
    frozen = replace(model, dtype=frozen_dtype(model.dtype, device), gradient_checkpointing=False)
    engine = HFGenerateEngine(load_model(frozen, device).eval(), tok, rollout, device, model.dtype,
                              own_logprobs=(trainer is not None and rollout.asynchronous) or rollout.max_staleness > 0,
                              routing=model.routing_replay if trainer is not None else "off")  # a trainer's only
    if trainer is not None:
        engine.load_weights(trainer.named_weights())
    return engine
