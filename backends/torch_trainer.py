"""The plain-torch trainer backend: transformers models, DDP or FSDP2, AdamW, atomic checkpoints.

Losses are computed from the final hidden states and the lm_head weight through
r1cli.kernels, so the [tokens x vocab] logits are only materialised by the
reference path (CPU) and never by the Triton path (CUDA).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from r1cli import kernels
from r1cli.config import Config
from r1cli.models import load_model, load_tokenizer, resolve_device
from r1cli.rl.losses import aggregate, aggregation_weights

from .base import RolloutBatch
from .distributed import all_gather_objects, all_reduce_sum, barrier, init_distributed


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


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sequences_grid(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device):
    """Right-padded prompt+completion rows and the flat indices of positions that predict completions.

    Row b's completion token j is predicted at position len(prompt_b) - 1 + j.
    """
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
    pos = torch.arange(width).expand(len(rows), -1).contiguous()
    idx, tgt = [], []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        start = b * width + len(p) - 1
        idx.extend(range(start, start + len(c)))
        tgt.extend(c)
    return (ids.to(device), pos.to(device), torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(tgt, dtype=torch.long, device=device))


class TorchTrainer:
    def __init__(self, cfg: Config, need_reference: bool = False):
        self.cfg = cfg
        device = resolve_device(cfg.train.device)
        self.dist = init_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.model = load_model(cfg.model, device)
        self.impl = kernels.pick_impl(cfg.train.kernels, device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.loss_module = HiddenLoss(self.model)
        self.wrapped = self._parallelize(self.loss_module)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.loss_module.parameters() if p.requires_grad], lr=o.lr,
            betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr_ratio))
        self.reference = None
        if need_reference:
            self.reference = load_model(cfg.model, device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ set-up
    def _parallelize(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        if self.cfg.parallel.data_parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for layer in getattr(self.model, self.model.base_model_prefix).layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    @property
    def generation_model(self) -> nn.Module | None:
        """The live policy for a colocated rollout engine, or None when its parameters are sharded
        (FSDP) and an engine must hold its own copy, refreshed through full_state_dict()."""
        if self.world_size > 1 and self.cfg.parallel.data_parallel == "fsdp":
            return None
        return self.model

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, value: float) -> float:
        return float(all_reduce_sum(value))

    def all_gather(self, obj) -> list:
        return all_gather_objects(obj)

    def barrier(self) -> None:
        barrier()

    # ------------------------------------------------------------------ optimizer step
    def _optimizer_step(self) -> dict:
        params = [p for p in self.loss_module.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
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
        if last or self.world_size == 1 or not hasattr(self.wrapped, "no_sync"):
            return nullcontext()
        return self.wrapped.no_sync()

    # ------------------------------------------------------------------ SFT
    def sft_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; loss = mean NLL over all target tokens
        of the global batch (every rank, every micro-batch), so any split gives the same gradient."""
        self.wrapped.train()
        local_tokens = sum(int((mb["targets"] != -100).sum()) for mb in micro_batches)
        global_tokens = max(1.0, self.all_reduce_sum(local_tokens))
        scale = self.world_size / global_tokens  # DDP averages over ranks; undo it
        total = 0.0
        for i, mb in enumerate(micro_batches):
            flat = mb["targets"].reshape(-1)
            idx = (flat != -100).nonzero().squeeze(-1)

            def nll_sum(hidden, weight, targets=flat[idx].to(self.device)):
                logp, _ = kernels.fused_linear_logprobs(hidden, weight, targets, impl=self.impl)
                return -logp.sum()

            with self._no_sync(i == len(micro_batches) - 1), self.autocast:
                loss_sum = self.wrapped(mb["input_ids"].to(self.device), mb["position_ids"].to(self.device),
                                        idx.to(self.device), nll_sum)
            (loss_sum * scale).backward()
            total += float(loss_sum.detach())
        out = self._optimizer_step()
        out["loss"] = self.all_reduce_sum(total) / global_tokens
        out["tokens"] = global_tokens
        return out

    @torch.no_grad()
    def sft_eval_loss(self, micro_batches: list[dict]) -> float:
        self.wrapped.eval()
        total, count = 0.0, 0
        for mb in micro_batches:
            flat = mb["targets"].reshape(-1)
            idx = (flat != -100).nonzero().squeeze(-1)
            with self.autocast:
                logp = self.loss_module(mb["input_ids"].to(self.device), mb["position_ids"].to(self.device),
                                        idx.to(self.device), lambda h, w: kernels.fused_linear_logprobs(
                                            h, w, flat[idx].to(self.device), impl=self.impl)[0])
            total += float(-logp.sum())
            count += idx.numel()
        return total / max(1, count)

    # ------------------------------------------------------------------ GRPO
    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, which: str = "policy") -> torch.Tensor:
        """[B, C] log-probs of each completion token under the policy or the reference (0 past the end)."""
        if which == "policy":
            module = self.loss_module  # through FSDP's root when sharded (every rank runs the same chunks)
        elif self.reference is not None:
            module = HiddenLoss(self.reference)
        else:
            raise RuntimeError("no reference model is loaded (grpo.beta == 0)")
        module.eval()
        mask = batch.completion_mask()
        out = torch.zeros_like(mask)
        mbs = max(1, self.cfg.train.micro_batch_size)
        temp = self.cfg.rollout.temperature
        for s in range(0, len(batch), mbs):
            sl = list(range(s, min(len(batch), s + mbs)))
            ids, pos, idx, tgt = sequences_grid([batch.prompt_ids[i] for i in sl],
                                                [batch.completion_ids[i] for i in sl],
                                                self.tokenizer.pad_token_id, self.device)
            with self.autocast:
                logp = module(ids, pos, idx, lambda h, w: kernels.fused_linear_logprobs(
                    h, w, tgt, temperature=temp, impl=self.impl)[0])
            sub = mask[sl]
            grid = torch.zeros_like(sub)
            grid[sub.bool()] = logp.float().cpu()
            out[sl, : grid.shape[1]] = grid
        return out

    def grpo_step(self, batch: RolloutBatch, global_seqs: float, global_tokens: float) -> dict:
        """One optimizer step on a mini-batch; the loss is normalised by the global mini-batch."""
        g = self.cfg.grpo
        self.wrapped.train()
        mask_all = batch.completion_mask() * batch.loss_weight.unsqueeze(-1)
        mbs = max(1, self.cfg.train.micro_batch_size)
        chunks = [list(range(s, min(len(batch), s + mbs))) for s in range(0, len(batch), mbs)]
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0}
        for ci, sl in enumerate(chunks):
            sub = batch.select(sl)
            mask = mask_all[sl, : sub.old_logp.shape[1]]
            ids, pos, idx, tgt = sequences_grid(sub.prompt_ids, sub.completion_ids, self.tokenizer.pad_token_id,
                                                self.device)
            present = sub.completion_mask().bool()
            flat = lambda x: x[present].to(self.device)  # noqa: E731  grid [b, C] -> tokens [N]
            adv_tok = flat(sub.advantages.unsqueeze(-1).expand_as(present).float())
            record = {}

            def loss_fn(hidden, weight):
                if g.ratio_level == "sequence":
                    logp, ent = kernels.fused_linear_logprobs(hidden, weight, tgt, temperature=self.cfg.rollout.temperature,
                                                              with_entropy=True, impl=self.impl)
                    return self._sequence_level_loss(logp, ent, sub, present, mask, record,
                                                     global_seqs, global_tokens)
                args = (hidden, weight, tgt, flat(sub.old_logp), None if sub.ref_logp is None else flat(sub.ref_logp),
                        adv_tok, flat(mask))
                kw = dict(eps_low=g.eps_low, eps_high=g.eps_high, beta=0.0 if g.kl_in_reward else g.beta,
                          kl=g.kl_estimator, temperature=self.cfg.rollout.temperature, dual_clip=g.dual_clip,
                          entropy_coef=g.entropy_coef, clamp=g.log_ratio_clamp, with_entropy=True, impl=self.impl)
                if self.cfg.train.fused_linear == "one_pass":  # the aggregation, as weights known before the forward
                    w = aggregation_weights(mask, g.loss_agg, **self._aggregation_kw(global_seqs, global_tokens))
                    loss, _, rec = kernels.fused_linear_grpo_objective(*args, flat(w), **kw)
                    record.update(kl=rec.kl, clipped=rec.clipped, entropy=rec.entropy)
                    return loss
                per_tok, rec = kernels.fused_linear_grpo_loss(*args, **kw)
                record.update(kl=rec.kl, clipped=rec.clipped, entropy=rec.entropy)
                grid = torch.zeros(present.shape, dtype=per_tok.dtype, device=per_tok.device)
                grid = grid.masked_scatter(present.to(per_tok.device), per_tok)
                return self._aggregate(grid, mask.to(grid.device), global_seqs, global_tokens)

            with self._no_sync(ci == len(chunks) - 1), self.autocast:
                loss = self.wrapped(ids, pos, idx, loss_fn)
            (loss * self.world_size).backward()  # DDP averages over ranks; the loss is already global
            m = flat(mask).float()
            sums["loss"] += float(loss.detach())
            sums["kl"] += float((record["kl"].float() * m).sum())
            sums["clipped"] += float((record["clipped"].float() * m).sum())
            if record.get("entropy") is not None:
                sums["entropy"] += float((record["entropy"].float() * m).sum())
            sums["tokens"] += float(m.sum())
        out = self._optimizer_step()
        tok = max(1.0, self.all_reduce_sum(sums["tokens"]))
        out["loss"] = self.all_reduce_sum(sums["loss"])
        out["kl"] = self.all_reduce_sum(sums["kl"]) / tok
        out["clip_frac"] = self.all_reduce_sum(sums["clipped"]) / tok
        out["entropy"] = self.all_reduce_sum(sums["entropy"]) / tok
        return out

    def _aggregation_kw(self, global_seqs, global_tokens):
        return dict(num_seqs=global_seqs, num_tokens=global_tokens, max_len=self.cfg.rollout.max_new_tokens)

    def _aggregate(self, grid, mask, global_seqs, global_tokens):
        return aggregate(grid, mask, self.cfg.grpo.loss_agg, **self._aggregation_kw(global_seqs, global_tokens))

    def _sequence_level_loss(self, logp, ent, sub, present, mask, record, global_seqs, global_tokens):
        from r1cli.rl.losses import per_token_policy_loss

        g = self.cfg.grpo
        dev = logp.device
        grid = torch.zeros(present.shape, dtype=logp.dtype, device=dev).masked_scatter(present.to(dev), logp)
        m = mask.to(dev)
        terms = per_token_policy_loss(
            grid, sub.old_logp.to(dev), None if sub.ref_logp is None else sub.ref_logp.to(dev),
            sub.advantages.to(dev).float(), m, eps_low=g.eps_low, eps_high=g.eps_high,
            beta=0.0 if g.kl_in_reward else g.beta, kl=g.kl_estimator, dual_clip=g.dual_clip,
            ratio_level="sequence", clamp=g.log_ratio_clamp)
        loss_grid = terms.pg + (0.0 if g.kl_in_reward else g.beta) * terms.kl
        if ent is not None:
            ent_grid = torch.zeros_like(grid).masked_scatter(present.to(dev), ent)
            loss_grid = loss_grid - g.entropy_coef * ent_grid
            record["entropy"] = ent.detach()
        record.update(kl=terms.kl.detach()[present.to(dev)], clipped=terms.clipped.detach()[present.to(dev)])
        return self._aggregate(loss_grid, m, global_seqs, global_tokens)

    def update_reference(self) -> None:
        if self.reference is not None:
            self.reference.load_state_dict(self.full_state_dict())

    # ------------------------------------------------------------------ state
    def full_state_dict(self, all_ranks: bool = True) -> dict[str, torch.Tensor]:
        """Unsharded policy weights (a collective: every rank calls it). With all_ranks=False only
        rank 0 receives them, on CPU (enough for writing files, and lighter)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
        sd = get_model_state_dict(self.loss_module, options=opts)
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank calls this (the state gathers are collective); rank 0 writes shared files."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        directory = Path(directory)
        model_sd = self.full_state_dict(all_ranks=False)
        optim_sd = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()},
                      str(directory / "model.safetensors"))
            torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "extra": extra},
                       directory / "trainer.pt")
            if self.reference is not None:
                save_file({k: v.detach().clone().contiguous() for k, v in self.reference.state_dict().items()},
                          str(directory / "reference.safetensors"))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   directory / f"rng_rank{self.rank}.pt")
        barrier()

    def load(self, directory: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        directory = Path(directory)
        sd = load_file(str(directory / "model.safetensors"))
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.loss_module, {"model." + k: v for k, v in sd.items()}, options=opts)
        blob = torch.load(directory / "trainer.pt", weights_only=False)
        set_optimizer_state_dict(self.loss_module, self.optimizer, blob["optimizer"], options=opts)
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.reference is not None and (directory / "reference.safetensors").is_file():
            self.reference.load_state_dict(load_file(str(directory / "reference.safetensors")))
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return blob["extra"]

    def export_hf(self, directory: Path) -> None:
        """A plain Hugging Face folder (config, safetensors, tokenizer) any tool can load."""
        sd = self.full_state_dict(all_ranks=False)
        if self.is_main:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(directory, state_dict=sd, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        barrier()
