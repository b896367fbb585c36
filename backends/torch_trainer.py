"""The plain-torch trainer backend: transformers models, DDP or FSDP2, AdamW, atomic checkpoints.

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
from r1cli.models.weight_names import to_checkpoint_names
from r1cli.run.checkpoint import restore_rng, save_rng
from r1cli.token_batch import TokenBatch, token_budget_micro_batches

from .parallel import add_metric_sums, init_parallel

ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpointed weights: the adapters only


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a (possibly FSDP-sharded) one; gathering is a collective, so every rank calls it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_model(cfg: ModelConfig) -> nn.Module:
    """The base architecture on the meta device, for save_pretrained to write a merged state dict under."""
    return load_model(replace(cfg, gradient_checkpointing=False), torch.device("cpu"), weights=False)


class HiddenLoss(nn.Module):
    """Runs the decoder and hands the chosen positions' hidden states + lm_head weight to `fn`.

    Wrapping this (not the bare model) in DDP/FSDP keeps the loss inside the wrapped
    forward, so gradient hooks and parameter unsharding see every parameter used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, token_index, fn):
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_index)
        return fn(hidden, self.model.lm_head.weight)


class TorchTrainer:
    # whether this backend splits one model over ranks; the torch backend replicates it (DDP / FSDP)
    model_parallel = False
    loss_inputs = frozenset(LossInput)  # log-probs, one-pass weighted terms, hidden states

    def __init__(self, model: ModelConfig, train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                 need_reference: bool = False):
        if not self.model_parallel and (parallel.tensor_parallel > 1 or parallel.pipeline_parallel > 1 or
                                        parallel.expert_parallel > 1):
            raise R1Error(f"parallel.backend={parallel.backend} is data parallel only: parallel.tensor_parallel="
                          f"{parallel.tensor_parallel}, parallel.pipeline_parallel={parallel.pipeline_parallel} and "
                          f"parallel.expert_parallel={parallel.expert_parallel} need a model-parallel backend "
                          "(megatron)")
        if model.precision == "fp8":
            raise R1Error("model.precision=fp8 needs parallel.backend=megatron (Transformer Engine layers)")
        self.model_cfg, self.train_cfg, self.optim_cfg, self.parallel_cfg = model, train, optim, parallel
        device = resolve_device(train.device)
        self.parallel = init_parallel(device, parallel.tensor_parallel, parallel.pipeline_parallel,
                                      parallel.timeout_min)
        if device.type == "cuda":
            device = torch.device("cuda", self.parallel.local_rank)
        self.device = device
        torch.manual_seed(train.seed)
        self.tokenizer = load_tokenizer(model.path)
        self.impl = kernels.pick_impl(train.kernels, device)
        self.autocast = autocast(model.dtype, device)
        self.lora = lora.enabled(model.lora)
        self.adapters = None  # the peft wrapper under LoRA (its config writes the adapter folder)
        self.model, self.loss_module = self._load(model)
        self.router_stats = RouterStats()  # a mixture of experts' routing during each train step
        hooked = hook_transformers_routers(self.model, self.router_stats)
        self.balance = load_balancing(self._hf_model()) if hooked else None
        self.wrapped = self._parallelize(self.loss_module)
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
    def _sharded(self) -> bool:
        return self.parallel.dp_size > 1 and self.parallel_cfg.torch.data_parallel == "fsdp"

    def _fully_shard(self, model: nn.Module, root: nn.Module, mp_policy: bool = True) -> None:
        """FSDP2 over the data-parallel ranks: each decoder layer, then the root (the rest)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.parallel.dp_size,))
        kw = {}
        low = compute_dtype(self.model_cfg.dtype, self.device)
        if mp_policy and low is not None:  # fp32 master weights, bf16 compute, fp32 gradient reduction
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for layer in getattr(model, model.base_model_prefix).layers:
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(root, mesh=mesh, **kw)

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

        def build(device: torch.device, weights: bool = True) -> nn.Module:
            m = load_model(cfg, device, weights=weights)
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
        self._fully_shard(model, root, mp_policy=not frozen)
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

    def _parallelize(self, module: nn.Module) -> nn.Module:
        if self.parallel.dp_size == 1 or self._sharded:  # sharded already by _load
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, process_group=self.parallel.dp_group)

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

    def _no_sync(self, last: bool):
        if last or self.parallel.dp_size == 1 or not hasattr(self.wrapped, "no_sync"):
            return nullcontext()
        return self.wrapped.no_sync()

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
        """A micro-batch's forward inputs: padded rows, or under train.max_tokens_per_micro_batch its rows packed into
        rows as wide as its longest (a dense attention's cost stays that of the padded rows; flash-attention on a
        GPU would take one row of everything)."""
        if self.train_cfg.max_tokens_per_micro_batch:
            mb = mb.packed(max(len(r) for r in mb.input_ids))
        return mb.tensors(self.tokenizer.pad_token_id, self.device)

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
            return self._logprobs(module, batch, temperature)

    def _logprobs(self, module: nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
        module.eval()
        mask = batch.scored_mask()
        out = torch.zeros_like(mask)
        for rows in self._micro_batches(batch):
            ids, pos, idx, tgt = self._tensors(batch.select(rows))
            with self.autocast:
                logp = module(ids, pos, idx, lambda h, w: kernels.fused_linear_logprobs(
                    h, w, tgt, temperature=temperature, impl=self.impl)[0])
            sub = mask[rows]
            grid = torch.zeros_like(sub)
            grid[sub.bool()] = logp.float().cpu()
            out[rows, : grid.shape[1]] = grid
        return out

    def train_step(self, batch: TokenBatch, loss) -> dict:
        """One optimizer step over this rank's rows in micro-batches; `loss` gives each micro-batch's share of
        the global loss, so every split (micro-batches, ranks) takes the same step."""
        self.wrapped.train()
        takes = choose_loss_input(loss, self.loss_inputs, self.parallel_cfg.torch.fused_linear == "one_pass", "torch")
        chunks = self._micro_batches(batch)
        sums: dict[str, float] = {}
        aux_sum = 0.0
        self.router_stats.start()
        for ci, rows in enumerate(chunks):
            mb = batch.select(rows)
            ids, pos, idx, tgt = self._tensors(mb)
            real = self._real_tokens(mb, ids)  # routing figures and the balancing loss leave padding out
            self.router_stats.mask = real.reshape(-1)
            if self.balance is not None:
                self.router_stats.gate_logits = []

            def loss_fn(hidden, weight, mb=mb, tgt=tgt):
                if takes is LossInput.HIDDEN:  # a loss over whole distributions (logit distillation)
                    return loss.from_hidden(hidden, weight, mb, tgt)
                if takes is LossInput.WEIGHTED_TERMS:  # the aggregation as weights known before the forward
                    w, per_token, to_sums = loss.weighted_terms(mb, hidden.device)
                    value, _, rec = kernels.fused_linear_weighted_loss(
                        hidden, weight, tgt, w, per_token, temperature=loss.temperature,
                        with_entropy=loss.wants_entropy, impl=self.impl)
                    return value, to_sums(value, rec)
                logp, ent = kernels.fused_linear_logprobs(hidden, weight, tgt, temperature=loss.temperature,
                                                          with_entropy=loss.wants_entropy, impl=self.impl)
                return loss(logp, ent, mb)

            with self._no_sync(ci == len(chunks) - 1), self.autocast:
                value, part = self.wrapped(ids, pos, idx, loss_fn)
            total = value * self.parallel.dp_size  # DDP averages over ranks; the loss is already global
            if self.balance is not None:  # the MoE load-balancing loss, averaged over micro-batches and ranks
                coef, aux = self.balance(self.router_stats.gate_logits, real)
                total = total + coef * aux / len(chunks)
                aux_sum += float(aux.detach()) / len(chunks)
                self.router_stats.gate_logits = None
            total.backward()
            add_metric_sums(sums, part)
        out = self._optimizer_step()
        out.update(loss.finish(self.parallel.reduce_metric_sums(sums)))
        out.update(self.router_stats.metrics(self.parallel.sum_tensor))
        if self.balance is not None:  # the load-balancing term before its coefficient, mean over ranks
            out["moe/aux_loss"] = self.parallel.all_reduce_sum(aux_sum) / self.parallel.dp_size
        self.router_stats.mask = None
        return out

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
            for name, full in self.named_weights():
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
        yield from to_checkpoint_names(self._hf_model(),
                                       ((name, _full(t)) for name, t in self.model.state_dict().items()))

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
            model_sd, weights_file = self.full_state_dict(), "model.safetensors"
        optim_sd = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.parallel.is_main:
            save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()}, str(directory / weights_file))
            torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "extra": extra},
                       directory / "trainer.pt")
        if self.reference is not None:
            ref = self.reference.state_dict()
            if self._sharded:  # gathered on every rank (a collective), written by rank 0
                opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                ref = {k.removeprefix("model."): v for k, v in
                       get_model_state_dict(self.reference_module, options=opts).items()}
            if self.parallel.is_main:
                save_file({k: v.detach().clone().contiguous() for k, v in ref.items()},
                          str(directory / "reference.safetensors"))
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
            set_model_state_dict(self.loss_module, weights("model.safetensors"), options=opts)
        blob = torch.load(directory / "trainer.pt", weights_only=False, mmap=True)
        set_optimizer_state_dict(self.loss_module, self.optimizer, blob["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.reference_module is not None and (directory / "reference.safetensors").is_file():
            set_model_state_dict(self.reference_module, weights("reference.safetensors"), options=opts)
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
