"""The megatron-core trainer backend: tensor, pipeline and data parallel GPTModel, megatron's schedules,
distributed optimizer and distributed checkpoints, behind the same door as the torch backend.

    parallel.backend: megatron      parallel.tensor_parallel / pipeline_parallel (DP = world / (TP x PP))
    parallel.expert_parallel        mixtures of experts: the experts over EP of the DP ranks (all-to-all dispatch)
    parallel.megatron.sequence_parallel  parallel.megatron.distributed_optimizer
    model.gradient_checkpointing (full or selective recompute: parallel.megatron.recompute)

The model is built from the HF config of model.path (or a `r1 convert hf-to-megatron` folder) and each rank
reads only its own shard. Losses run on the last pipeline stage from the final hidden states and this TP rank's
vocabulary shard of the output weight (r1cli.kernels.vocab_parallel): the [tokens x vocabulary] logits are never
gathered on one rank. Every micro-batch is padded to one [micro_batch_size, L] shape, as the pipeline's
point-to-point buffers need.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from r1cli.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from r1cli.errors import R1Error
from r1cli.interfaces import LossInput, choose_loss_input
from r1cli.kernels.ops import pick_impl
from r1cli.lr_schedule import lr_factor
from r1cli.models.loading import load_tokenizer, resolve_device
from r1cli.models.router_stats import RouterStats
from r1cli.run.checkpoint import restore_rng, save_rng
from r1cli.token_batch import TokenBatch, token_budget_micro_batches

from ..parallel import DistributedContext, add_metric_sums, group_device, start_process_group
from .context_parallel import check_context_parallel, split_row
from .convert import (
    LAYOUT_FILE,
    TensorFolder,
    copy_hf_side_files,
    hf_tensors_from,
    publish,
    rank_state,
    read_hf_config,
    staging_for,
    write_hf_shards,
)
from .families import Shape, check_layout, padded_vocab, te_name
from .model import (
    build_gpt_model,
    check_fp8,
    check_local_attention,
    follow_position_ids,
    import_megatron,
    load_converted,
    output_hidden_states,
    use_te_layers,
)


def sample_mask(pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] True where attention is masked, for packed rows: a token sees the earlier tokens of its own
    sample (a sample starts where the positions do not count on by one), as transformers masks packed rows."""
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    sample = starts.long().cumsum(1)
    same = sample[:, :, None] == sample[:, None, :]
    causal = torch.ones(pos.shape[1], pos.shape[1], dtype=torch.bool, device=pos.device).tril()
    return ~(same & causal)[:, None]


# Transformer Engine's FP8 GEMMs assert that their token count is divisible by this (8 for some layouts, 16 for
# others: 16 serves both)
FP8_TOKEN_MULTIPLE = 16


def row_width(longest: int, tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """The padded width of a micro-batch's rows: a multiple of TP under sequence parallelism (the sequence is split
    over the TP ranks), and under FP8 one whose per-rank token count is a multiple of FP8_TOKEN_MULTIPLE whatever
    the micro-batch size."""
    split = tp if sequence_parallel else 1
    step = split * FP8_TOKEN_MULTIPLE if fp8 else split
    return -(-longest // step) * step


def thd_params(pos: torch.Tensor) -> dict:
    """The packed rows [B, S] of a micro-batch as one THD sequence for Transformer Engine's attention (megatron's
    PackedSeqParams fields): a sample starts at every row start and wherever the positions do not count on by one;
    cu_seqlens are the int32 cumulative lengths from 0 to B x S (TE's rules: int32, starting at 0, strictly
    increasing, ending at the token count; the attention mask is then None)."""
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    flat = starts.reshape(-1)
    cu = torch.cat([flat.nonzero().reshape(-1), torch.tensor([flat.numel()], device=pos.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


def hook_routers(model, stats: RouterStats) -> None:
    """Record each megatron-core router's logits (its gating) and routing map into `stats`."""
    from megatron.core.transformer.moe.router import TopKRouter

    for name, module in model.named_modules():
        if isinstance(module, TopKRouter):
            gating = module.gating

            def keep_logits(x, _gating=gating, _m=module):
                _m.r1_logits = _gating(x)
                return _m.r1_logits

            module.gating = keep_logits
            module.register_forward_hook(lambda m, args, out, _n=name: stats.add(_n, out[1], m.r1_logits,
                                                                                 m.score_function))


def _source(path: str) -> tuple[dict, Path, dict | None]:
    """(HF config, folder with the tokenizer, megatron layout or None) of model.path."""
    folder = Path(path)
    if (folder / LAYOUT_FILE).is_file():
        layout = json.loads((folder / LAYOUT_FILE).read_text())
        return layout["hf_config"], folder / "hf", layout
    return read_hf_config(folder), folder, None


def _megatron_optimizers(optimizer) -> list:
    """The per-buffer optimizers of megatron's ChainedOptimizer (or the one optimizer); `.optimizer` of each is the
    torch Adam underneath."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _keep_torch_adam_step(optimizer) -> None:
    """megatron-core 0.16's distributed optimizer, over torch's Adam (no TE or apex installed), restores a fully
    reshardable checkpoint by copying every state tensor of a parameter, `step` included, from a source that
    leaves `step` out (it is restored through the param groups): the copy's source gets the step it already has."""
    for opt in _megatron_optimizers(optimizer):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue

        def set_states(model_param, tensors, _opt=opt, _orig=opt._set_main_param_and_optimizer_states):
            group, order = _opt.model_param_group_index_map[model_param]
            step = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step.clone()}
            _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


def reference_recipe(policy: str | None) -> str | None:
    """The FP8 recipe of the reference model. It only ever runs under no_grad, and Transformer Engine updates a
    delayed recipe's scales only when leaving a grad-enabled fp8_autocast: a delayed reference would keep scale 1.0
    for good (E4M3 flushing weights below 2^-9 to zero) and give wrong log-probs and KL. Current (tensorwise)
    scaling takes each tensor's scale from that tensor, with no history to update."""
    return "current" if policy else None


class MegatronTrainer:
    model_parallel = True
    loss_inputs = frozenset({LossInput.LOGPROBS})  # the loss runs on vocabulary shards: no whole distributions

    def __init__(self, model: ModelConfig, train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                 need_reference: bool = False):
        self.model_cfg, self.train_cfg, self.optim_cfg, self.parallel_cfg = model, train, optim, parallel
        tp, pp, ep = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel
        self.ep = ep
        self.hf_cfg, self.hf_folder, layout = _source(model.path)
        self.shape = Shape.from_hf(self.hf_cfg)
        cp = parallel.context_parallel
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % cp:
            raise R1Error(f"{world} processes do not split into context_parallel={cp} groups")
        check_layout(self.shape, tp, pp, world // cp, ep=ep)
        if parallel.megatron.sequence_parallel and tp == 1:
            raise R1Error("parallel.megatron.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.shape.experts is not None and tp > 1 and not parallel.megatron.sequence_parallel:
            raise R1Error(f"a mixture of experts at tensor_parallel={tp} trains with sequence parallelism "
                          "(megatron-core requires it): set parallel.megatron.sequence_parallel=true")
        if parallel.megatron.expert_bias_update_rate and not (self.shape.experts and self.shape.experts.bias):
            raise R1Error(f"parallel.megatron.expert_bias_update_rate moves DeepSeek-V3's expert bias; "
                          f"{self.shape.model_type} routes without one")
        converted = layout and (layout["tensor_parallel"], layout["pipeline_parallel"],
                                layout.get("expert_parallel", 1))
        if layout is not None and converted != (tp, pp, ep):
            raise R1Error(f"{model.path} was converted for tensor_parallel x pipeline_parallel x expert_parallel = "
                          f"{' x '.join(map(str, converted))}, not {tp} x {pp} x {ep}: convert the HF folder again or "
                          "point model.path at the HF folder (each rank then reads its own shard)")
        self.fp8 = model.fp8_recipe if model.precision == "fp8" else None
        if self.fp8:
            check_fp8()
        device = resolve_device(train.device)
        self.te = use_te_layers(parallel.megatron.layers, self.fp8 is not None, device.type == "cuda")
        if cp > 1:
            check_context_parallel(cp, self.te, pp, self.shape)
        import_megatron()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import random as mrandom

        self.ps = ps
        self.cp = None  # the context-parallel group's gather, under parallel.context_parallel > 1
        self.parallel = self._layout(device, tp, pp)
        self.device = torch.device("cuda", self.parallel.local_rank) if device.type == "cuda" else device
        if device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(train.seed)
        mrandom.model_parallel_cuda_manual_seed(train.seed)
        self.tokenizer = load_tokenizer(str(self.hf_folder))
        # bf16 parameters under megatron's mixed-precision optimizer (fp32 main weights and Adam state): on CUDA
        # under auto, on any device under bf16-mixed
        bf16 = model.dtype == "bf16-mixed" or (device.type == "cuda" and model.dtype in ("auto", "bfloat16"))
        self.dtype = torch.bfloat16 if bf16 else {"float16": torch.float16}.get(model.dtype, torch.float32)
        self.vocab_shard = padded_vocab(self.shape.vocab, tp) // tp
        self.vocab_start = self.parallel.tp_rank * self.vocab_shard
        self.model = self._build(layout, self.fp8)
        self.router_stats = RouterStats()  # a mixture of experts' routing during each train step
        hook_routers(self.model, self.router_stats)
        self.wrapped, self.optimizer = self._wrap(self.model)
        self.reference = self._build(layout, reference_recipe(self.fp8)).eval().requires_grad_(False) \
            if need_reference else None
        self.impl = pick_impl(train.kernels, self.device)
        self._shapes = self._piece_shapes()
        self.steps_done = 0

    # ------------------------------------------------------------------ set-up
    def _layout(self, device, tp: int, pp: int) -> DistributedContext:
        start_process_group(device, self.parallel_cfg.timeout_min)
        ps = self.ps
        if ps.model_parallel_is_initialized():  # a second trainer in this process (tests, r1 pipeline)
            ps.destroy_model_parallel()
        cp = self.parallel_cfg.context_parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=self.ep, context_parallel_size=cp)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        ctx = DistributedContext(dist.get_rank(), dist.get_world_size(), local, tp, pp,
                                 dp_group=ps.get_data_parallel_group(), tp_group=ps.get_tensor_model_parallel_group(),
                                 pp_group=ps.get_pipeline_model_parallel_group(),
                                 mp_group=ps.get_model_parallel_group() if tp * pp > 1 else None,
                                 device=group_device(device, local), cp_size=cp,
                                 cp_group=ps.get_context_parallel_group() if cp > 1 else None)
        assert (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank) == (ps.get_tensor_model_parallel_rank(),
                                                            ps.get_data_parallel_rank(),
                                                            ps.get_pipeline_model_parallel_rank())
        if cp > 1:  # a replica is its TP x CP (x PP) ranks: megatron's model-parallel group leaves CP out
            assert ctx.cp_rank == ps.get_context_parallel_rank()
            for d in range(ctx.dp_size):
                g = dist.new_group([r for r in range(ctx.world_size) if (r // (tp * cp)) % ctx.dp_size == d])
                if ctx.dp_rank == d:
                    ctx.mp_group = g
            from ..context_parallel import ContextParallel

            self.cp = ContextParallel(cp, ctx.cp_rank, ctx.cp_group, ctx.on_group_device)
        return ctx

    def _build(self, layout, fp8: str | None):
        """One model on this rank's shard, its linear layers in FP8 with recipe `fp8` (None: no FP8)."""
        p, m = self.parallel, self.model_cfg
        model = build_gpt_model(self.hf_cfg, p.tp_size, p.pp_size, self.dtype,
                                sequence_parallel=self.parallel_cfg.megatron.sequence_parallel,
                                recompute=self.parallel_cfg.megatron.recompute if m.gradient_checkpointing else None,
                                fp8=fp8, te=self.te, ep=self.ep, cp=self.parallel.cp_size,
                                bias_rate=self.parallel_cfg.megatron.expert_bias_update_rate)
        known = model.state_dict().keys()
        if layout is not None:
            load_converted(model, Path(m.path), rename=lambda name: self._name(name, known))
        else:  # straight from the HF folder: this rank's shard only
            state = rank_state(TensorFolder(self.hf_folder), self.shape, p.tp_size, p.pp_size, p.tp_rank, p.pp_rank,
                               self.ep, self.ps.get_expert_model_parallel_rank())
            missing, unexpected = model.load_state_dict({self._name(k, known): v for k, v in state.items()},
                                                        strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"megatron state from {m.path}: missing {missing}, unexpected {unexpected}")
        if self.shape.experts is not None:
            # experts count as expert parallel at EP=1 too (reduced over the expert data-parallel group, which is
            # then the whole data-parallel one): the optimizer is [dense, experts] at every EP, so a checkpoint's
            # Adam state loads at another EP
            for name, q in model.named_parameters():
                if ".experts." in name:
                    q.allreduce = False
        if self.device.type == "cuda":
            model = model.to(self.device)
        follow_position_ids(model)
        if self.ps.is_pipeline_last_stage():
            output_hidden_states(model)
        return model

    def _name(self, name: str, known) -> str:
        """A local-spec megatron name (the converter's) as this model, whose tensors are `known`, calls it."""
        return te_name(name, known) if self.te else name

    def _wrap(self, model):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o, dist_opt = self.optim_cfg, self.parallel_cfg.megatron.distributed_optimizer
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt, overlap_grad_reduce=False), model)
        model.config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2,
            adam_eps=o.eps, clip_grad=o.grad_clip, bf16=self.dtype == torch.bfloat16,
            fp16=self.dtype == torch.float16, params_dtype=self.dtype, use_distributed_optimizer=dist_opt), [ddp])
        _keep_torch_adam_step(optimizer)
        return ddp, optimizer

    def _piece_shapes(self) -> list[dict[str, tuple]]:
        """For each pipeline stage, its local tensors' (shape, dtype): what a broadcast from that stage sends."""
        mine = {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()
                if not k.endswith("_extra_state")}
        if self.parallel.pp_size == 1:
            return [mine]
        out = [None] * self.parallel.pp_size
        dist.all_gather_object(out, mine, group=self.parallel.pp_group)
        return out

    @property
    def generation_model(self):
        return None  # sharded: a colocated engine keeps its own copy, refreshed through named_weights()

    # ------------------------------------------------------------------ micro-batches through the schedule
    def _micro_batch_size(self, batch: TokenBatch) -> int:
        return max(1, min(self.train_cfg.micro_batch_size, len(batch)))

    def _plan(self, batch: TokenBatch) -> tuple[list[list[int]], int]:
        """The rows of each micro-batch and the micro-batch size: micro_batch_size padded rows, or under
        train.max_tokens_per_micro_batch the rows packed into one row of at most that many tokens (micro-batch
        size 1; the stages of a pipeline plan alike: they hold the same rows)."""
        budget = self.train_cfg.max_tokens_per_micro_batch
        if budget:
            lengths = [len(r) for r in batch.input_ids]
            plan = token_budget_micro_batches(lengths, budget)
            # every data-parallel rank runs as many micro-batches: FP8's amax reduction and a mixture of experts'
            # all-to-all meet in each one (ranks whose rows pack into fewer halve their fullest)
            count = int(self.parallel.all_reduce_max(len(plan)))
            return (token_budget_micro_batches(lengths, budget, count) if count > len(plan) else plan), 1
        mbs = self._micro_batch_size(batch)
        return [list(range(s, min(len(batch), s + mbs))) for s in range(0, len(batch), mbs)], mbs

    def _check_local_attention(self, width: int, rows: int) -> None:
        from r1cli.run.memory_plan import available_bytes

        m = self.model_cfg
        check_local_attention(width, rows, self.shape.heads // self.parallel.tp_size,
                              self.shape.layers // self.parallel.pp_size, torch.finfo(self.dtype).bits // 8,
                              self.parallel_cfg.megatron.recompute if m.gradient_checkpointing else None,
                              available_bytes(self.device))

    def _micro_batches(self, batch: TokenBatch) -> tuple[list, int, int]:
        if self.cp is not None:
            return self._context_parallel_micro_batches(batch)
        plan, mbs = self._plan(batch)
        packing = bool(self.train_cfg.max_tokens_per_micro_batch)
        longest = max(sum(len(batch.input_ids[b]) for b in rows) for rows in plan) if packing else \
            max(len(r) for r in batch.input_ids)
        width = row_width(longest, self.parallel.tp_size, self.parallel_cfg.megatron.sequence_parallel,
                          self.fp8 is not None)
        if not self.te:
            self._check_local_attention(width, mbs)
        out = []
        for rows in plan:
            mb = batch.select(rows)
            ids, pos, idx, tgt = (mb.packed() if packing else mb).tensors(self.tokenizer.pad_token_id, "cpu")
            w = ids.shape[1]
            full_ids = torch.full((mbs, width), self.tokenizer.pad_token_id, dtype=torch.long)
            full_pos = torch.arange(width).expand(mbs, -1).clone()
            full_ids[: len(ids), :w], full_pos[: len(ids), :w] = ids, pos
            idx = (idx // w) * width + idx % w
            d = self.device
            mask, thd = None, None
            several = packing or batch.position_ids is not None  # rows holding several samples
            if several and self.te:  # TE's attention: one THD sequence, no mask
                thd = thd_params(full_pos.to(d))
                full_ids, full_pos = full_ids.reshape(1, -1), full_pos.reshape(1, -1)
            elif several:
                mask = sample_mask(full_pos).to(d)
            out.append((rows, mb, full_ids.to(d), full_pos.to(d), mask, thd, idx.to(d), tgt.to(d), None))
        if self.te and (packing or batch.position_ids is not None):
            return out, width * mbs, 1
        return out, width, mbs

    def _schedule(self, module, batch: TokenBatch, head, forward_only: bool) -> tuple[list, list]:
        """Run `head(hidden, weight, mb, tgt, gather) -> (loss, dict)` (_head) on every micro-batch through megatron's
        schedule (1F1B under PP); returns the micro-batches and, on the last stage, the heads' dicts."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks, width, mbs = self._micro_batches(batch)
        model = module.module if hasattr(module, "module") else module

        def step(data, m):
            rows, mb, ids, pos, mask, thd, idx, tgt, split = next(data)
            model.position_ids = pos
            if thd is not None:
                from megatron.core.packed_seq_params import PackedSeqParams

                hidden = m(ids, pos, None, packed_seq_params=PackedSeqParams(**thd))
            else:
                hidden = m(ids, pos, mask)
            return hidden, functools.partial(self._head, head=head, mb=mb, idx=idx, tgt=tgt, model=model,
                                             split=split)

        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(chunks), model=[module],
                                          num_microbatches=len(chunks), seq_length=width, micro_batch_size=mbs,
                                          forward_only=forward_only)
        return chunks, out

    def _head(self, hidden, *, head, mb, idx, tgt, model, split):
        """head(hidden of the scored tokens, this rank's vocabulary shard of the output weight, mb, targets,
        gather): `gather` puts a per-token vector of this rank's scored tokens into the micro-batch's whole [N]
        (every context-parallel rank's, in order; the identity without context parallelism)."""
        weight = model.shared_embedding_or_output_weight() if self.shape.tied else model.output_layer.weight
        valid = max(0, min(self.vocab_shard, self.shape.vocab - self.vocab_start))
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        return head(h, weight[:valid], mb, tgt, self._gather(split))

    def _gather(self, split):
        if split is None:
            return lambda x: x
        from ..context_parallel import Layout

        r = self.parallel.cp_rank
        layout = Layout([], sum(split.counts[:r]), split.counts[r], split.counts)
        order = split.order.to(self.device)
        return lambda x: None if x is None else self.cp.gather(x, layout)[order]

    def _context_parallel_micro_batches(self, batch: TokenBatch) -> tuple[list, int, int]:
        """Under context parallelism (Transformer Engine's THD attention): each micro-batch one packed row, of which
        this rank holds its chunks of every sample (backends/megatron/context_parallel.py)."""
        plan, _ = self._plan(batch)
        p, d = self.parallel, self.device
        multiple = (p.tp_size if self.parallel_cfg.megatron.sequence_parallel else 1) * \
            (FP8_TOKEN_MULTIPLE if self.fp8 is not None else 1)
        out = []
        for rows in plan:
            mb = batch.select(rows)
            ids, pos, idx, tgt = mb.packed().tensors(self.tokenizer.pad_token_id, "cpu")
            split = split_row(ids, pos, idx, tgt, self.tokenizer.pad_token_id, p.cp_size, p.cp_rank, multiple)
            thd = {k: v.to(d) if isinstance(v, torch.Tensor) else v for k, v in split.thd.items()}
            out.append((rows, mb, split.ids.to(d), split.pos.to(d), None, thd, split.idx.to(d), split.tgt.to(d),
                        split))
        return out, max(c[2].shape[1] for c in out), 1

    def _vocab_logprobs(self, h, w, tgt, temperature, with_entropy):
        from r1cli.kernels.vocab_parallel import vocab_parallel_fused_linear_logprobs

        return vocab_parallel_fused_linear_logprobs(h, w, tgt, self.vocab_start, self.parallel.tp_group,
                                                    temperature=temperature, with_entropy=with_entropy, impl=self.impl)

    def _last_stage_rank(self) -> int:
        return dist.get_process_group_ranks(self.parallel.pp_group)[-1]

    # ------------------------------------------------------------------ the two doors
    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, which: str = "policy", temperature: float = 1.0) -> torch.Tensor:
        if which == "policy":
            module = self.wrapped
        elif self.reference is not None:
            module = self.reference
        else:
            raise RuntimeError("no reference model is loaded (grpo.beta == 0)")
        module.eval()

        def head(h, w, mb, tgt, gather):
            logp, _ = self._vocab_logprobs(h, w, tgt, temperature, False)
            return logp.sum() * 0, {"logp": gather(logp).float().cpu()}

        chunks, parts = self._schedule(module, batch, head, forward_only=True)
        mask = batch.scored_mask()
        out = torch.zeros_like(mask)
        if self.ps.is_pipeline_last_stage():
            for (rows, *_), part in zip(chunks, parts):
                sub = mask[rows]
                grid = torch.zeros_like(sub)
                grid[sub.bool()] = part["logp"]
                out[rows, : grid.shape[1]] = grid
        if self.parallel.pp_size > 1:  # from the last stage, on the device the group serves
            out = self.parallel.on_group_device(out)
            dist.broadcast(out, src=self._last_stage_rank(), group=self.parallel.pp_group)
        return out.cpu()

    def train_step(self, batch: TokenBatch, loss) -> dict:
        choose_loss_input(loss, self.loss_inputs, False, "megatron")  # log-probs, or a one-line refusal
        self.wrapped.train()
        self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optim_cfg.lr * lr_factor(self.steps_done, self.optim_cfg, self.train_cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_micro = len(self._plan(batch)[0])
        # the schedule averages over micro-batches, DDP over the data (x context) parallel ranks; each context-parallel
        # rank computes the whole micro-batch's loss from the gathered log-probs, its gradient reaching its own tokens
        scale = n_micro * self.parallel.dp_size * self.parallel.cp_size

        def head(h, w, mb, tgt, gather):
            logp, ent = self._vocab_logprobs(h, w, tgt, loss.temperature, loss.wants_entropy)
            value, part = loss(gather(logp), gather(ent), mb)
            return value * scale, part

        self.router_stats.start()
        _, parts = self._schedule(self.wrapped, batch, head, forward_only=False)
        grad_norm = float(self._grad_norm())
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            ok, _, _ = self.optimizer.step()
            skipped = not ok
            self.steps_done += 0 if skipped else 1
        out = {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}
        metrics = None
        if self.ps.is_pipeline_last_stage():
            sums: dict = {}
            for part in parts:
                add_metric_sums(sums, {k: float(v) for k, v in part.items()})
            metrics = loss.finish(self.parallel.reduce_metric_sums(sums))
        if self.parallel.pp_size > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=self._last_stage_rank(), group=self.parallel.pp_group)
            metrics = box[0]
        out.update(metrics)
        out.update(self._router_metrics())
        return out

    def _router_metrics(self) -> dict:
        """The step's routing over every layer (each pipeline stage holds some) and data-parallel rank (each routes
        its own tokens; TP ranks route the same ones, or under sequence parallelism each its slice of them)."""
        st = self.router_stats
        if self.shape.experts is None:
            st.active = False
            return {}
        if self.parallel.pp_size > 1:
            mine = {f"{self.parallel.pp_rank}.{k}": (st.counts[k], st.probs[k], st.tokens[k]) for k in st.counts}
            every = [None] * self.parallel.pp_size
            dist.all_gather_object(every, mine, group=self.parallel.pp_group)
            merged = {k: v for part in every for k, v in part.items()}
            st.counts = {k: v[0] for k, v in merged.items()}
            st.probs = {k: v[1] for k, v in merged.items()}
            st.tokens = {k: v[2] for k, v in merged.items()}
        p = self.parallel

        def total(t: torch.Tensor) -> torch.Tensor:
            t = p.sum_tensor(t)
            if self.parallel_cfg.megatron.sequence_parallel and p.tp_size > 1:
                t = p.on_group_device(t)
                dist.all_reduce(t, group=p.tp_group)
            return t.cpu()

        return st.metrics(total)

    def _grad_norm(self) -> float:
        self.optimizer.prepare_grads()
        return self.optimizer.get_grad_norm()

    def update_reference(self) -> None:
        """The policy's weights into the reference; not Transformer Engine's FP8 state (`_extra_state`: the
        delayed recipe's scales and amax history), which the reference's own recipe does not use."""
        if self.reference is not None:
            state = {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
            missing, unexpected = self.reference.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"reference refresh: missing {missing}, unexpected {unexpected}")

    # ------------------------------------------------------------------ weights and state
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor), gathered over the TP ranks and sent from its pipeline stage one tensor at a
        time (a collective: every rank iterates, in the same order)."""
        p = self.parallel
        local = self.model.state_dict()
        cache: dict = {}

        def gather(piece: torch.Tensor, size: int, group) -> list[torch.Tensor]:
            if size == 1:
                return [piece]
            pieces = [p.on_group_device(torch.empty_like(piece)) for _ in range(size)]
            dist.all_gather(pieces, piece, group=group)
            return pieces

        def get(t: int, stage: int, name: str, e: int = 0) -> torch.Tensor:
            if cache.get("key") != (stage, name):
                cache["key"], own = (stage, name), self._name(name, self._shapes[stage])
                shape, dtype = self._shapes[stage][own]
                piece = local[own].detach() if stage == p.pp_rank else torch.empty(shape, dtype=dtype)
                piece = p.on_group_device(piece.contiguous())
                if p.pp_size > 1:
                    src = dist.get_process_group_ranks(p.pp_group)[stage]
                    dist.broadcast(piece, src=src, group=p.pp_group)
                if ".local_experts." in name:  # an expert's piece: expert rank e's local expert, then its TP shards
                    ps = self.ps
                    cache["pieces"] = [gather(q, ps.get_expert_tensor_parallel_world_size(),
                                              ps.get_expert_tensor_parallel_group())
                                       for q in gather(piece, self.ep, ps.get_expert_model_parallel_group())]
                else:
                    cache["pieces"] = [gather(piece, p.tp_size, p.tp_group)]
            pieces = cache["pieces"]
            return pieces[e if len(pieces) > 1 else 0][t]

        yield from hf_tensors_from(get, self.shape, p.tp_size, p.pp_size, self.ep)

    def _sharded_state(self, loading: bool) -> dict:
        if loading:
            self._fill_empty_adam_state()
        state = {"model": self.model.sharded_state_dict(prefix="model.")}
        # fully_reshardable: the Adam state in the model's own parameter shapes, so a checkpoint loads at any
        # TP x PP x DP (the layout-bound formats reshard over DP only)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            state["model"], is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        if self.reference is not None:
            state["reference"] = self.reference.sharded_state_dict(prefix="reference.")
        return state

    def _fill_empty_adam_state(self) -> None:
        """A fresh torch Adam has no state to load into (megatron's distributed optimizer reads the step from it
        when it builds the load template): zeros, step 0, as Adam's first step would make them."""
        for opt in _megatron_optimizers(self.optimizer):
            inner = opt.optimizer
            for group in inner.param_groups:
                for q in group["params"]:
                    if not inner.state[q]:
                        inner.state[q].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(q),
                                              exp_avg_sq=torch.zeros_like(q))

    def save(self, directory: Path, extra: dict) -> None:
        """megatron's distributed checkpoint (every rank writes its shards; loadable at another TP x PP), plus the
        step counter, extra and each rank's RNG state."""
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        dist_checkpointing.save(self._sharded_state(loading=False), str(directory))
        if self.parallel.is_main:
            torch.save({"extra": extra, "steps_done": self.steps_done,
                        "layout": [self.parallel.tp_size, self.parallel.pp_size]}, directory / "trainer.pt")
        save_rng(directory, self.parallel.rank)
        self.parallel.barrier()

    def load(self, directory: Path) -> dict:
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        state = dist_checkpointing.load(self._sharded_state(loading=True), str(directory))
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()}, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        for opt in _megatron_optimizers(self.optimizer):
            for st in opt.optimizer.state.values():  # megatron hands every parameter one shared `step` tensor,
                if "step" in st:  # which torch's Adam then counts up once per parameter
                    st["step"] = st["step"].clone()
        if self.reference is not None and "reference" in state:
            self.reference.load_state_dict({k.removeprefix("reference."): v for k, v in state["reference"].items()},
                                           strict=False)
        blob = torch.load(directory / "trainer.pt", weights_only=False)
        self.steps_done = blob["steps_done"]
        if list(blob["layout"]) == [self.parallel.tp_size, self.parallel.pp_size]:  # same ranks, same streams
            restore_rng(directory, self.parallel.rank)
        return blob["extra"]

    def export_hf(self, directory: Path) -> None:
        """A plain Hugging Face folder (config, safetensors, tokenizer): rank 0 writes it shard by shard."""
        directory = Path(directory)
        weights = self.named_weights()
        if self.parallel.is_main:  # written beside, then swapped in: an interrupted export leaves the old one
            tmp = staging_for(directory, overwrite=True)
            write_hf_shards(((n, t.cpu()) for n, t in weights), tmp)
            copy_hf_side_files(self.hf_folder, tmp)
            publish(tmp, directory)
        else:
            for _ in weights:
                pass
        self.parallel.barrier()
