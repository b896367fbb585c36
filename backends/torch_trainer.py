"""The plain-torch trainer backend: transformers models, replicated (gradients averaged over the ranks after each
step's micro-batches) or sharded by FSDP2, context parallelism (backends/context_parallel.py), AdamW, atomic
checkpoints.

Losses are computed from the final hidden states and the lm_head weight through
r1cli.kernels, so the [tokens x vocab] logits are only materialised by the
reference path (CPU) and never by the Triton path (CUDA). What the loss is comes
from the caller (r1cli.interfaces.TokenLoss): this file knows no GRPO variant.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from r1cli.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from r1cli.errors import R1Error
from r1cli.interfaces import LossInput, choose_loss_input
from r1cli.kernels import ops as kernels
from r1cli.lr_schedule import lr_factor
from r1cli.models import lora
from r1cli.models.loading import autocast, compute_dtype, frozen_dtype, load_model, load_tokenizer, resolve_device
from r1cli.models.router_stats import RouterStats, hook_transformers_routers, load_balancing
from r1cli.models.routing_replay import routing_hooks
from r1cli.models.value_head import to_value_head, values_at
from r1cli.models.weight_names import to_checkpoint_names
from r1cli.run.checkpoint import restore_rng, save_rng
from r1cli.token_batch import TokenBatch, token_budget_micro_batches

from .parallel import add_metric_sums, init_parallel

ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpointed weights: the adapters only
GRAD_BUCKET_BYTES = 64 << 20  # gradients averaged over the ranks this many bytes at a time


class _OutOfMemory(Exception):
    """A micro-batch ran out of memory and can be split (its index in the step's plan)."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


def _injected_oom(rank: int) -> tuple[int, int] | None:
    """R1_FAULT_OOM=STEP:MICRO_BATCH[:RANK]: the (train step, micro-batch) at which this rank raises an out-of-memory
    once, after the forward (tests of the split; steps count from 1 in this process)."""
    import os

    spec = os.environ.get("R1_FAULT_OOM")
    if not spec:
        return None
    step, index, *who = (int(x) for x in spec.split(":"))
    return (step, index) if not who or who[0] == rank else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a (possibly FSDP-sharded) one; gathering is a collective, so every rank calls it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_model(cfg: ModelConfig) -> nn.Module:
    """The base architecture on the meta device, for save_pretrained to write a merged state dict under."""
    return load_model(replace(cfg, gradient_checkpointing=False), torch.device("cpu"), weights=False)


class HiddenLoss(nn.Module):
    """Runs the decoder and hands the chosen positions' hidden states + lm_head weight to `fn`.

    Wrapping this (not the bare model) in FSDP keeps the loss inside the wrapped
    forward, so parameter unsharding sees every parameter used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, token_index, fn):
        """fn(hidden [N, H] of the positions `token_index` picks, lm_head weight) -> the loss (or log-probs)."""
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_index)
        return fn(hidden, self.model.lm_head.weight)


class TorchTrainer:
    # whether this backend splits one model over ranks; the torch backend replicates it (DDP / FSDP)
    model_parallel = False
    loss_inputs = frozenset(LossInput)  # log-probs, one-pass weighted terms, hidden states

    def __init__(self, model: ModelConfig, train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                 need_reference: bool = False, value_head: bool = False):
        """value_head: a critic (PPO's value model): the lm_head replaced by a zero [1 x hidden] head whose output at
        each scored token's position is V, its files named critic_* in a checkpoint beside the policy's."""
        self.value_head = value_head
        self.files = "critic_" if value_head else ""
        if not self.model_parallel and (parallel.tensor_parallel > 1 or parallel.pipeline_parallel > 1 or
                                        parallel.expert_parallel > 1):
            raise R1Error(f"parallel.backend={parallel.backend} is data parallel only: parallel.tensor_parallel="
                          f"{parallel.tensor_parallel}, parallel.pipeline_parallel={parallel.pipeline_parallel} and "
                          f"parallel.expert_parallel={parallel.expert_parallel} need a model-parallel backend "
                          "(megatron)")
        if model.precision == "fp8":
            raise R1Error("model.precision=fp8 needs parallel.backend=megatron (Transformer Engine layers)")
        self.model_cfg, self.train_cfg, self.optim_cfg, self.parallel_cfg = model, train, optim, parallel
        if parallel.context_parallel > 1:  # what it cannot split, before any process group or model
            from transformers import AutoConfig

            from .context_parallel import check_model

            check_model(AutoConfig.from_pretrained(model.path, local_files_only=True), parallel.context_parallel,
                        model.path)
        device = resolve_device(train.device)
        self.parallel = init_parallel(device, parallel.tensor_parallel, parallel.pipeline_parallel,
                                      parallel.timeout_min, parallel.context_parallel)
        if device.type == "cuda":
            device = torch.device("cuda", self.parallel.local_rank)
        self.device = device
        torch.manual_seed(train.seed)
        self.cp = self._context_parallel()  # None without context parallelism
        self.tokenizer = load_tokenizer(model.path)
        self.impl = kernels.pick_impl(train.kernels, device)
        self.autocast = autocast(model.dtype, device)
        self.lora = lora.enabled(model.lora)
        self.adapters = None  # the peft wrapper under LoRA (its config writes the adapter folder)
        self.model, self.loss_module = self._load(model)
        self.router_stats = RouterStats()  # a mixture of experts' routing during each train step
        self.moe = hook_transformers_routers(self.model, self.router_stats)
        self.balance = load_balancing(self._hf_model()) if self.moe else None
        # model.routing_replay: the engine's recorded experts checked against (replay: used by) the policy's forwards
        self.routing = routing_hooks(self.model) if model.routing_replay != "off" and not value_head else None
        if model.routing_replay != "off" and not value_head and self.routing is None:
            raise R1Error(f"model.routing_replay={model.routing_replay} replays a mixture of experts' routing; the "
                          f"model at {model.path} has no top-k routers: set model.routing_replay=off")
        # replicated: the gradients are averaged by _average_gradients after each step's micro-batches (no DDP,
        # whose gradient collectives run inside the last backward, where an out-of-memory could not be retried)
        self.wrapped = self.loss_module
        self.train_steps = 0
        self._fault, self._fault_fired = _injected_oom(self.parallel.rank), False
        self.optimizer = torch.optim.AdamW(
            [p for p in self.loss_module.parameters() if p.requires_grad], lr=optim.lr,
            betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, optim, train.steps))
        self.reference = self.reference_module = None
        self.has_reference = need_reference
        if need_reference and not self.lora:  # frozen: in the compute dtype, sharded like the policy
            self.reference, self.reference_module = self.frozen_copy(model)
        # under LoRA the reference is the policy with its adapters switched off: no second copy

    # ------------------------------------------------------------------ set-up
    @property
    def _grad_ranks(self) -> int:
        """The ranks gradients are averaged over (and FSDP shards over): data x context parallel."""
        return self.parallel.dp_size * self.parallel.cp_size

    @property
    def _sharded(self) -> bool:
        return self._grad_ranks > 1 and self.parallel_cfg.torch.data_parallel == "fsdp"

    def _context_parallel(self):
        """parallel.context_parallel > 1: the group that splits each sequence, its attention registered for the
        trainer's models before any of them loads."""
        if self.parallel.cp_size == 1:
            return None
        from .context_parallel import ContextParallel

        cp = ContextParallel(self.parallel.cp_size, self.parallel.cp_rank, self.parallel.cp_group,
                             self.parallel.on_group_device)
        cp.register()
        return cp

    def _replay(self, mb: TokenBatch):
        """model.routing_replay around a micro-batch's forward (and backward): its recorded experts laid out as
        _tensors lays its rows."""
        if self.routing is None or mb.routing is None:
            return nullcontext()
        rows = mb.packed(max(len(r) for r in mb.input_ids)) if self.train_cfg.max_tokens_per_micro_batch else mb
        return self.routing.replay(rows.routing_grid(), swap=self.model_cfg.routing_replay == "replay")

    def _cp_active(self, layout):
        return self.cp.active(layout) if self.cp is not None else nullcontext()

    def _fully_shard(self, model: nn.Module, root: nn.Module, frozen: bool = False) -> None:
        """FSDP2 over the data-parallel ranks: each decoder layer, then the root (the rest). A frozen model's root
        reshards after its forward too: FSDP2 keeps a root gathered for the backward it expects, which a model
        that only runs under no_grad never has (the embeddings and lm_head, 2.2 GB at 7B, stayed whole)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self._grad_ranks,))
        kw = {}
        low = compute_dtype(self.model_cfg.dtype, self.device)
        if not frozen and low is not None:  # fp32 master weights, bf16 compute, fp32 gradient reduction
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for layer in getattr(model, model.base_model_prefix).layers:
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(root, mesh=mesh, reshard_after_forward=True if frozen else None, **kw)

    def frozen_copy(self, cfg: ModelConfig) -> tuple[nn.Module, HiddenLoss]:
        """A frozen model (the reference, a distillation teacher) beside the policy: in the compute dtype (bf16 under
        mixed precision), sharded like the policy under FSDP. Call its HiddenLoss on every rank in step (a sharded
        forward gathers), under no_grad."""
        frozen = replace(cfg, dtype=frozen_dtype(cfg.dtype, self.device), gradient_checkpointing=False,
                         lora=replace(cfg.lora, rank=0))
        return self._load(frozen, frozen=True)

    def _load(self, cfg: ModelConfig, frozen: bool = False) -> tuple[nn.Module, HiddenLoss]:
        """The model and its HiddenLoss root, sharded under FSDP. Sharded, no device ever holds the whole model:
        rank 0 reads the weights into CPU memory, every rank builds the model on the meta device, shards it,
        allocates only its shard on the device, and receives rank 0's tensors one at a time (the other ranks read
        no weight file). A frozen model (the reference) runs in its own dtype, without a mixed-precision policy.
        Under model.lora the base weights are frozen in the compute dtype and only the fp32 adapters train."""
        adapted = lora.enabled(cfg.lora)
        if adapted:  # the base is frozen: held as a frozen copy is (bf16 under mixed precision)
            cfg = replace(cfg, dtype=frozen_dtype(cfg.dtype, self.device))
        if self.cp is not None:  # attention across the ranks that split each sequence
            from .context_parallel import ATTENTION

            cfg = replace(cfg, attn_implementation=ATTENTION)

        def build(device: torch.device, weights: bool = True) -> nn.Module:
            m = load_model(cfg, device, weights=weights)
            if self.value_head:
                to_value_head(m)
            if frozen:
                m.eval().requires_grad_(False)
            elif adapted:
                torch.manual_seed(self.train_cfg.seed)  # the same adapters on every rank and in every build
                self.adapters = lora.add_adapters(m, cfg.lora)
            return m

        if not self._sharded:
            model = build(self.device)
            return model, HiddenLoss(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = build(torch.device("cpu")) if self.parallel.is_main else None
        model = build(self.device, weights=False)
        root = HiddenLoss(model)
        self._fully_shard(model, root, frozen=frozen)
        root.to_empty(device=self.device)
        weights = {"model." + k: v for k, v in full.state_dict().items()} if full is not None else {}
        set_model_state_dict(root, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self._broadcast_buffers(model, full)
        return model, root

    def _broadcast_buffers(self, model: nn.Module, full: nn.Module | None) -> None:
        """Buffers outside the state dict (rotary inv_freq) are garbage after to_empty: rank 0's, to every rank."""
        import torch.distributed as dist

        source = dict(full.named_buffers()) if full is not None else {}
        for name, buf in model.named_buffers():
            t = self.parallel.on_group_device(source[name].clone() if full is not None else torch.empty_like(buf))
            dist.broadcast(t, src=0)
            buf.copy_(t)

    @property
    def generation_model(self) -> nn.Module | None:
        """The live policy for a colocated rollout engine, or None when its parameters are sharded
        (FSDP) and an engine must hold its own copy, refreshed through named_weights()."""
        if self._sharded:
            return None
        return self.model

    # ------------------------------------------------------------------ optimizer step
    def _optimizer_step(self) -> dict:
        params = [p for p in self.loss_module.parameters() if p.grad is not None]
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": grad_norm, "lr": lr, "skipped": 1.0}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": 0.0}

    def _micro_batches(self, batch: TokenBatch) -> list[list[int]]:
        """The rows of each forward: micro_batch_size padded rows, or under train.max_tokens_per_micro_batch rows of
        at most that many tokens in all, packed into rows as wide as the longest (as many forwards on every rank when
        FSDP shards: each one gathers the parameters)."""
        budget = self.train_cfg.max_tokens_per_micro_batch
        if budget:
            lengths = [len(r) for r in batch.input_ids]
            plan = token_budget_micro_batches(lengths, budget)
            if self._sharded:
                plan = token_budget_micro_batches(lengths, budget, int(self.parallel.all_reduce_max(len(plan))))
            return plan
        mbs = max(1, self.train_cfg.micro_batch_size)
        return [list(range(s, min(len(batch), s + mbs))) for s in range(0, len(batch), mbs)]

    def _tensors(self, mb: TokenBatch):
        """A micro-batch's forward inputs and its context-parallel layout (None without): padded rows, or under
        train.max_tokens_per_micro_batch its rows packed into rows as wide as its longest (a dense attention's cost
        stays that of the padded rows; flash-attention on a GPU would take one row of everything). Under context
        parallelism one packed row, of which this rank takes its slice."""
        if self.cp is not None:
            ids, pos, idx, tgt = mb.packed().tensors(self.tokenizer.pad_token_id, self.device)
            return self.cp.split(ids, pos, idx, tgt, self.tokenizer.pad_token_id)
        if self.train_cfg.max_tokens_per_micro_batch:
            mb = mb.packed(max(len(r) for r in mb.input_ids))
        return (*mb.tensors(self.tokenizer.pad_token_id, self.device), None)

    # ------------------------------------------------------------------ the two doors
    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, which: str = "policy", temperature: float = 1.0) -> torch.Tensor:
        """[B, C] log-probs of each row's scored tokens under the policy or the reference (0 past the end)."""
        base = nullcontext()
        if which == "policy":
            module = self.loss_module  # through FSDP's root when sharded (every rank runs the same chunks)
        elif self.reference_module is not None:
            module = self.reference_module
        elif self.lora and self.has_reference:  # the base model: the policy with its adapters off
            module, base = self.loss_module, lora.adapters_off(self.model)
        else:
            raise RuntimeError("no reference model is loaded (grpo.beta == 0)")
        with base:
            return self._per_token(module, batch, lambda h, w, tgt: kernels.fused_linear_logprobs(
                h, w, tgt, temperature=temperature, impl=self.impl)[0], replay=which == "policy")

    @torch.no_grad()
    def values(self, batch: TokenBatch) -> torch.Tensor:
        """A critic's [B, C] values V at each row's scored tokens (the state before each; 0 past the end)."""
        if not self.value_head:
            raise RuntimeError("values() is a critic's (value_head=True)")
        return self._per_token(self.loss_module, batch, lambda h, w, tgt: values_at(h, w))

    def _per_token(self, module: nn.Module, batch: TokenBatch, fn, replay: bool = False) -> torch.Tensor:
        """[B, C] fn(hidden, head weight, targets) of each row's scored tokens, in micro-batches (0 past the end);
        replay: the policy's forward, routed as model.routing_replay says."""
        module.eval()
        mask = batch.scored_mask()
        out = torch.zeros_like(mask)
        plan = self._micro_batches(batch)
        while plan:  # a micro-batch that runs out of memory is halved (rows are independent here)
            rows = plan.pop(0)
            mb = batch.select(rows)
            ids, pos, idx, tgt, layout = self._tensors(mb)
            failed = False
            try:
                with self.autocast, self._cp_active(layout), self._replay(mb) if replay else nullcontext():
                    logp = module(ids, pos, idx, lambda h, w: fn(h, w, tgt))
            except torch.OutOfMemoryError:
                failed = True
            if failed:  # (outside the handler: the failed forward's tensors are gone)
                self._recover_memory(batch, rows)
                plan = self._split(batch, [rows], 0) + plan
                continue
            if layout is not None:  # every rank's slice of the row
                logp = self.cp.gather(logp, layout)
            sub = mask[rows]
            grid = torch.zeros_like(sub)
            grid[sub.bool()] = logp.float().cpu()
            out[rows, : grid.shape[1]] = grid
        if hasattr(module, "reshard"):  # an FSDP root: a no_grad pass has no backward to keep it gathered for
            module.reshard()
        return out

    def train_step(self, batch: TokenBatch, loss) -> dict:
        """One optimizer step over this rank's rows in micro-batches; `loss` gives each micro-batch's share of
        the global loss, so every split (micro-batches, ranks) takes the same step.

        A micro-batch that runs out of memory costs a split, not the run: its gradients so far are dropped, it is
        halved, and this rank's micro-batches run again (the step's value is the unsplit one up to summation order;
        train/oom_splits counts the splits). The forward and backward of a replicated model hold no collective, so
        one rank can redo its share while the others wait at one flag per round; the gradients are averaged over
        the ranks once every rank is through. Under FSDP or context parallelism the other ranks would be waiting
        inside the failed micro-batch's collectives: there an out-of-memory is one line naming what to change."""
        self.wrapped.train()
        takes = choose_loss_input(loss, self.loss_inputs, self.parallel_cfg.torch.fused_linear == "one_pass", "torch")
        plan = self._micro_batches(batch)
        self.train_steps += 1
        splits, done, sums, aux_sum = 0, False, {}, 0.0
        while True:  # one round: this rank's micro-batches, again after a split
            if not done:
                try:
                    sums, aux_sum = self._accumulate(batch, plan, loss, takes)
                    done = True
                except _OutOfMemory as oom:
                    self.optimizer.zero_grad(set_to_none=True)
                    plan = self._split(batch, plan, oom.index)
                    splits += 1
            alone = self._grad_ranks == 1 or not self._splittable  # (not splittable: an out-of-memory raised)
            if done if alone else self.parallel.all_reduce_max(float(not done)) == 0:  # every rank through
                break
        self._average_gradients()
        if self.cp is not None and takes is not LossInput.LOGPROBS:  # each rank's sums are of its own range
            sums = self.cp.sum_over_ranks(sums)
        out = self._optimizer_step()
        out.update(loss.finish(self.parallel.reduce_metric_sums(sums)))
        out.update(self.router_stats.metrics(self.parallel.sum_tensor))
        if self.routing is not None:  # the share of recorded token-layers the policy routed alike, every rank's
            agree, total = self.routing.agree, self.routing.total
            self.routing.take_agreement()
            total = self.parallel.all_reduce_sum(total)
            if total:
                out["moe/routing_agreement"] = self.parallel.all_reduce_sum(agree) / total
        if self.balance is not None:  # the load-balancing term before its coefficient, mean over ranks
            out["moe/aux_loss"] = self.parallel.all_reduce_sum(aux_sum) / self.parallel.dp_size
        self.router_stats.mask = None
        out["train/oom_splits"] = self.parallel.all_reduce_sum(splits)
        if self.train_cfg.max_tokens_per_micro_batch:
            out["train/token_budget"] = float(self.train_cfg.max_tokens_per_micro_batch)
        return out

    def _accumulate(self, batch: TokenBatch, plan: list[list[int]], loss, takes) -> tuple[dict, float]:
        """Forward and backward of every micro-batch of `plan`, gradients added up; (metric sums, MoE aux sum).
        Raises _OutOfMemory(index) when one runs out of memory and can be split (else a one-line R1Error)."""
        sums: dict[str, float] = {}
        aux_sum = 0.0
        self.router_stats.start()
        for ci, rows in enumerate(plan):
            failed = False
            try:
                part, aux = self._micro_step(batch.select(rows), loss, takes, len(plan), ci)
            except torch.OutOfMemoryError:
                failed = True
            if failed:  # (outside the handler: the failed step's tensors are gone)
                self._recover_memory(batch, rows)
                raise _OutOfMemory(ci)
            add_metric_sums(sums, part)
            aux_sum += aux
        return sums, aux_sum

    def _micro_step(self, mb: TokenBatch, loss, takes, n_micro: int, index: int) -> tuple[dict, float]:
        """One micro-batch's forward and backward; (its metric sums, its MoE aux term)."""
        ids, pos, idx, tgt, layout = self._tensors(mb)
        real = self._real_tokens(mb, ids) if self.moe else None  # routing figures leave padding out
        self.router_stats.mask = None if real is None else real.reshape(-1)
        if self.balance is not None:
            self.router_stats.gate_logits = []

        def loss_fn(hidden, weight):
            if takes is LossInput.HIDDEN:  # a loss over whole distributions (logit distillation)
                return loss.from_hidden(hidden, weight, mb, tgt, (ids, pos, idx))
            if takes is LossInput.WEIGHTED_TERMS:  # the aggregation as weights known before the forward
                mine = slice(None) if layout is None else slice(layout.first, layout.first + layout.count)
                w, per_token, to_sums = loss.weighted_terms(mb, hidden.device, mine)
                value, _, rec = kernels.fused_linear_weighted_loss(
                    hidden, weight, tgt, w, per_token, temperature=loss.temperature,
                    with_entropy=loss.wants_entropy, impl=self.impl)
                return value, to_sums(value, rec)
            logp, ent = kernels.fused_linear_logprobs(hidden, weight, tgt, temperature=loss.temperature,
                                                      with_entropy=loss.wants_entropy, impl=self.impl)
            if layout is not None:  # the whole rows' log-probs, the same loss on every rank of the group
                logp, ent = self.cp.gather(logp, layout), None if ent is None else self.cp.gather(ent, layout)
            return loss(logp, ent, mb)

        replay = self._replay(mb)
        with self.autocast, self._cp_active(layout), replay:
            value, part = self.wrapped(ids, pos, idx, loss_fn)
        # gradients are averaged over the data (x context) parallel ranks and the loss is already global; under
        # context parallelism the ranks' gradients (each from its own tokens) add up to the micro-batch's
        total = value * self._grad_ranks
        aux = 0.0
        if self.balance is not None:  # the MoE load-balancing loss, averaged over micro-batches and ranks
            coef, aux_t = self.balance(self.router_stats.gate_logits, real)
            total = total + coef * aux_t / n_micro
            aux = float(aux_t.detach()) / n_micro
            self.router_stats.gate_logits = None
        if self._fault == (self.train_steps, index) and not self._fault_fired:  # R1_FAULT_OOM: a test's injection
            self._fault_fired = True
            raise torch.OutOfMemoryError(f"injected by R1_FAULT_OOM at step {self.train_steps}, micro-batch {index}")
        # checkpointed layers run their forward again, attention included (and routed as the forward was)
        with self._cp_active(layout), self._replay(mb):
            total.backward()
        return part, aux

    def _recover_memory(self, batch: TokenBatch, rows: list[int]) -> None:
        """After an out-of-memory in these rows: the allocator's cache back to the device, or the one line where the
        micro-batch cannot be split and retried."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self._splittable:
            raise R1Error(self._out_of_memory(batch, rows, splittable=False))

    @property
    def _splittable(self) -> bool:
        """Whether an out-of-memory can be retried: no collective inside a forward or backward (a replicated
        model, one rank per sequence)."""
        return not self._sharded and self.cp is None

    def _split(self, batch: TokenBatch, plan: list[list[int]], index: int) -> list[list[int]]:
        """`plan` with micro-batch `index` halved (its rows alternately, longest first: about half the tokens each)."""
        rows = plan[index]
        if len(rows) == 1:
            raise R1Error(self._out_of_memory(batch, rows, splittable=True))
        order = sorted(rows, key=lambda b: -len(batch.input_ids[b]))
        return plan[:index] + [sorted(order[::2]), sorted(order[1::2])] + plan[index + 1:]

    def _out_of_memory(self, batch: TokenBatch, rows: list[int], splittable: bool) -> str:
        """The one line for an out-of-memory that cannot be split further: the length, and what would make it fit."""
        tokens = sum(len(batch.input_ids[b]) for b in rows)
        what = (f"a sample of {tokens} tokens does not fit in memory on {self.device} even alone" if splittable else
                f"out of memory on {self.device} in a micro-batch of {len(rows)} rows, {tokens} tokens (under FSDP or "
                "context parallelism the other ranks wait inside its collectives: it is not split and retried)")
        options = [] if splittable else ["a smaller train.max_tokens_per_micro_batch or train.micro_batch_size"]
        if not self.model_cfg.gradient_checkpointing:
            options.append("model.gradient_checkpointing=true (a layer keeps only its input)")
        options.append(f"parallel.context_parallel={2 * self.parallel.cp_size} (each rank holds 1/N of a sequence)")
        options.append("shorter samples (rollout.max_new_tokens; data.max_seq_len)")
        return f"{what}; to make it fit: {'; '.join(options)}"

    def _average_gradients(self) -> None:
        """The mean of every gradient over the data (x context) parallel ranks of a replicated model (FSDP reduces
        its own), in flat buckets per dtype; once per step, after every rank's micro-batches are through."""
        if self._grad_ranks == 1 or self._sharded:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        for p in params:  # a parameter none of this rank's rows reached still takes part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        for p in params:
            group = buckets.setdefault(p.grad.dtype, [[]])
            if sum(g.numel() for g in group[-1]) * p.grad.element_size() > GRAD_BUCKET_BYTES:
                group.append([])
            group[-1].append(p.grad)
        for grads in (b for group in buckets.values() for b in group if b):
            flat = self.parallel.on_group_device(_flatten_dense_tensors(grads).div_(self._grad_ranks))
            dist.all_reduce(flat, group=self.parallel.grad_group)
            for g, mean in zip(grads, _unflatten_dense_tensors(flat.to(grads[0].device), grads)):
                g.copy_(mean)

    def _real_tokens(self, mb: TokenBatch, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] True at each row's tokens, False at its right padding (rows as _tensors lays them)."""
        rows = mb.packed(ids.shape[1]).input_ids if self.train_cfg.max_tokens_per_micro_batch else mb.input_ids
        lengths = torch.tensor([len(r) for r in rows], device=ids.device)
        return torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]

    def update_reference(self) -> None:
        """The reference becomes the policy, one tensor at a time (never a whole state dict at once), each rank
        keeping its own shard, cast to the reference's dtype."""
        if self.lora and self.has_reference:
            raise R1Error("under model.lora the reference is the base model (the adapters off) and cannot follow "
                          "the policy: set grpo.ref_update_every=0")
        if self.reference is None:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        targets = self.reference.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, full in self._gathered():  # in-memory names, as the reference holds them (fused experts)
                t = targets[name]
                if isinstance(t, DTensor):  # every rank holds the full tensor: each cuts its own shard, no traffic
                    full = distribute_tensor(full.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None)
                    t.to_local().copy_(full.to_local())
                else:
                    t.copy_(full)

    # ------------------------------------------------------------------ weights and state
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, full tensor) one at a time; a sharded parameter is gathered alone (a collective: every
        rank iterates in the same order). A mixture of experts' fused tensors go out per expert, as its files name
        them (r1cli.models.weight_names)."""
        if self.lora:  # the adapters folded in, under the base model's names (what an engine and the export take)
            yield from to_checkpoint_names(self._hf_model(), lora.merged_weights(self.model, _full))
            return
        yield from to_checkpoint_names(self._hf_model(), self._gathered())

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(in-memory name, whole tensor) of the policy, one at a time (a collective when sharded)."""
        return ((name, _full(t)) for name, t in self.model.state_dict().items())

    def _hf_model(self):
        """The transformers model itself (under LoRA, the one peft wraps)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded policy weights on CPU, on rank 0 only (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.loss_module, options=opts)
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank calls this (the state gathers are collective); rank 0 writes shared files."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        directory = Path(directory)
        if self.lora:  # the adapters alone: the base is model.path, whose content the run's identity records
            model_sd, weights_file = self.adapter_state_dict(), ADAPTER_FILE
        else:
            model_sd, weights_file = self.full_state_dict(), self.files + "model.safetensors"
        optim_sd = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.parallel.is_main:
            save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()}, str(directory / weights_file))
            torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "extra": extra},
                       directory / (self.files + "trainer.pt"))
        if self.reference is not None:
            ref = self.reference.state_dict()
            if self._sharded:  # gathered on every rank (a collective), written by rank 0
                opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                ref = {k.removeprefix("model."): v for k, v in
                       get_model_state_dict(self.reference_module, options=opts).items()}
            if self.parallel.is_main:
                save_file({k: v.detach().clone().contiguous() for k, v in ref.items()},
                          str(directory / "reference.safetensors"))
        if not self.value_head:  # the policy's trainer keeps the generators' states (one set per rank)
            save_rng(directory, self.parallel.rank)
        self.parallel.barrier()

    def load(self, directory: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        directory = Path(directory)
        # sharded: rank 0 reads the weights and each tensor reaches every rank's shard in turn; the optimizer file
        # is memory-mapped (each rank copies out its shard one tensor at a time; the pages are shared on a node)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self._sharded)

        def weights(name: str) -> dict:
            if self._sharded and not self.parallel.is_main:
                return {}
            return {"model." + k: v for k, v in load_file(str(directory / name)).items()}

        if self.lora:
            self._load_adapters(directory / ADAPTER_FILE)
        else:
            set_model_state_dict(self.loss_module, weights(self.files + "model.safetensors"), options=opts)
        blob = torch.load(directory / (self.files + "trainer.pt"), weights_only=False, mmap=True)
        set_optimizer_state_dict(self.loss_module, self.optimizer, blob["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.reference_module is not None and (directory / "reference.safetensors").is_file():
            set_model_state_dict(self.reference_module, weights("reference.safetensors"), options=opts)
        if not self.value_head:
            restore_rng(directory, self.parallel.rank)
        return blob["extra"]

    def export_hf(self, directory: Path) -> None:
        """A plain Hugging Face folder (config, safetensors, tokenizer) any tool can load; under LoRA the adapters
        merged into it, and the PEFT adapter folder beside it (`<directory>-adapter`: hf-adapter in RUN_ARTIFACTS)."""
        directory = Path(directory)
        if self.lora:
            adapters = self.adapter_state_dict()
            # every rank takes part in each tensor's gather; rank 0 alone keeps the merged model
            sd = {k: v.detach().cpu() for k, v in self.named_weights() if self.parallel.is_main}
            if self.parallel.is_main:
                lora.write_adapter_folder(self.adapters, adapters, self.model_cfg.path,
                                          directory.with_name(directory.name + "-adapter"))
        else:
            sd = self.full_state_dict()
        if self.parallel.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            owner = _plain_model(self.model_cfg) if self.lora else self.model  # the merged names are the base's
            owner.save_pretrained(directory, state_dict=sd, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        self.parallel.barrier()

    # ------------------------------------------------------------------ LoRA adapters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters, whole, under their names in the model (a collective when sharded: every rank calls it)."""
        return {name: _full(p.detach()).cpu() for name, p in lora.trainable(self.model)}

    def _load_adapters(self, path: Path) -> None:
        """Every rank reads the (small) adapter file and keeps its own shard of each tensor."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        saved = load_file(str(path))
        params = dict(lora.trainable(self.model))
        if set(saved) != set(params):
            raise R1Error(f"{path} holds other adapters than model.lora makes ({len(saved)} tensors saved, "
                          f"{len(params)} made): resume with the run's own model.lora settings")
        with torch.no_grad():
            for name, p in params.items():
                t = saved[name].to(p.dtype)
                if isinstance(p, DTensor):
                    t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(t.to_local())
                else:
                    p.copy_(t)
