"""`r1 rl`: the GRPO loop, top to bottom.

Per step: prompts -> G samples each -> rewards -> group advantages -> old/ref
log-probs -> mu passes of clipped-objective mini-batch steps -> new weights to the
rollout engine. It talks only to a trainer backend and a rollout engine
(backends/base.py) and never imports torch.distributed, megatron or vllm.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from r1cli import checkpoint as ckpt
from r1cli.backends.base import RolloutBatch
from r1cli.config import Config, save_config
from r1cli.errors import R1Error
from r1cli.evaluate import held_out_accuracy, reward_context
from r1cli.metrics import MetricsLog, StepProgress, console
from r1cli.records import field, read_records
from r1cli.rewards import check_weights, score
from r1cli.rl.advantages import equal_reward_groups, group_advantages, overlong_penalty
from r1cli.rl.losses import kl_penalty
from r1cli.sft_data import RowSchedule
from r1cli.templates import render_prompt


def build_trainer(cfg: Config):
    if cfg.parallel.backend == "megatron":
        raise R1Error("parallel.backend=megatron is not built yet; use parallel.backend=torch")
    from r1cli.backends.torch_trainer import TorchTrainer

    return TorchTrainer(cfg, need_reference=cfg.grpo.beta > 0)


def build_engine(cfg: Config, trainer):
    if cfg.rollout.engine == "vllm":
        raise R1Error("rollout.engine=vllm is not built yet; use rollout.engine=hf")
    from r1cli.backends.hf_rollout import hf_engine_for

    return hf_engine_for(trainer, cfg)


def validate(cfg: Config, world_size: int) -> None:
    g, r = cfg.grpo, cfg.rollout
    if g.prompts_per_step % world_size:
        raise R1Error(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of the {world_size} ranks")
    seqs = g.prompts_per_step * r.n
    if g.mini_batch_size and (seqs % g.mini_batch_size or g.mini_batch_size % world_size):
        raise R1Error(f"grpo.mini_batch_size={g.mini_batch_size} must divide the {seqs} samples per step "
                      f"and be a multiple of the {world_size} ranks")
    if r.n < 2 and g.advantage in ("grpo", "rloo"):
        raise R1Error("rollout.n must be at least 2: advantages are relative to the group")


def sample_seed(seed: int, step: int, position: int) -> int:
    """A seed per (step, prompt position in the global batch): sharding does not change the samples."""
    return (seed * 1_000_003 + step) * 100_003 + position


def run_rl(cfg: Config, resume: bool = False) -> dict:
    rows = read_records(cfg.data.train, cfg.data.max_samples)
    eval_rows = read_records(cfg.data.eval)[: cfg.train.eval_samples] if cfg.data.eval else []
    check_weights(cfg.rewards.weights)  # before loading a model
    trainer = build_trainer(cfg)
    validate(cfg, trainer.world_size)
    engine = build_engine(cfg, trainer)
    run_dir = Path(cfg.train.output_dir)
    if trainer.is_main:
        save_config(cfg, run_dir)
    tok = trainer.tokenizer
    prompts = [render_prompt(tok, str(field(r, cfg.data.prompt_field, cfg.data.train, i)), cfg.data)
               for i, r in enumerate(rows)]
    g, t = cfg.grpo, cfg.train
    schedule = RowSchedule(len(rows), g.prompts_per_step, t.seed, cfg.data.shuffle)
    log = MetricsLog(run_dir, trainer.is_main, cfg.logging.tensorboard, fresh=not resume)
    ctx = reward_context(cfg)

    start = 0
    if resume:
        start = trainer.load(ckpt.require_latest(run_dir))["step"]
        log.truncate_after(start)
        if trainer.is_main:
            console.print(f"resumed from step {start}")
    elif eval_rows:
        log.log(0, held_out_accuracy(trainer, engine, eval_rows, cfg))

    bar = StepProgress(t.steps, start, trainer.is_main and cfg.logging.progress,
                       [("reward/total", "reward"), ("reward/accuracy", "acc"), ("response_len/mean", "len"),
                        ("kl", "kl"), ("rollout_tokens_per_s", "tok/s")])
    bad_streak = 0
    last: dict = {}
    per_rank = g.prompts_per_step // trainer.world_size
    for step in range(start, t.steps):
        # 1. prompts for this rank, and G samples of each
        idx = schedule.rows_for_step(step)
        positions = list(range(trainer.rank * per_rank, (trainer.rank + 1) * per_rank))
        my_rows = [rows[idx[p]] for p in positions]
        t0 = time.perf_counter()
        groups = engine.generate([prompts[idx[p]] for p in positions], cfg.rollout.n,
                                 [sample_seed(t.seed, step, p) for p in positions])
        t_rollout = time.perf_counter() - t0
        samples = [c for grp in groups for c in grp]
        sample_rows = [r for r in my_rows for _ in range(cfg.rollout.n)]

        # 2. rewards (a failing checker is that sample's 0)
        scores = score([c.text for c in samples], sample_rows, cfg.rewards.weights, ctx)
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        lengths = torch.tensor([len(c.completion_ids) for c in samples])
        truncated = torch.tensor([c.truncated for c in samples], dtype=torch.bool)
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, g.overlong_buffer,
                                             g.overlong_penalty)
        batch = RolloutBatch([c.prompt_ids for c in samples], [c.completion_ids for c in samples],
                             torch.zeros(len(samples)), torch.ones(len(samples)))

        # 3. log-probs under the sampling policy and the reference
        t1 = time.perf_counter()
        batch.old_logp = trainer.logprobs(batch, "policy")
        if g.beta > 0:
            batch.ref_logp = trainer.logprobs(batch, "reference")
        if g.beta > 0 and g.kl_in_reward:
            mask = batch.completion_mask()
            kl_seq = (kl_penalty(batch.old_logp, batch.ref_logp, g.kl_estimator) * mask).sum(-1)
            rewards = rewards - g.beta * kl_seq

        # 4. group-relative advantages; groups without signal and truncated samples leave the loss
        batch.advantages = group_advantages(rewards, cfg.rollout.n, g.advantage, g.adv_eps)
        flat_groups = equal_reward_groups(rewards, cfg.rollout.n)
        weight = torch.ones(len(samples))
        if g.drop_equal_groups:
            weight = weight * (~flat_groups).repeat_interleave(cfg.rollout.n).float()
        if g.overlong_filter:
            weight = weight * (~truncated).float()
        batch.loss_weight = weight

        # 5. mu passes of mini-batch optimizer steps
        train_out = _optimize(trainer, batch, cfg, step)
        t_train = time.perf_counter() - t1
        engine.load_weights(trainer)
        if g.ref_update_every and (step + 1) % g.ref_update_every == 0:
            trainer.update_reference()

        # 6. metrics, samples, checkpoint
        bad_streak = bad_streak + 1 if train_out["skipped"] else 0
        if bad_streak >= g.max_bad_steps:
            raise R1Error(f"stopping at step {step + 1}: {bad_streak} steps in a row had a non-finite loss or "
                          f"gradient (lower optim.lr, check data); the last good checkpoint is in {run_dir}")
        last = _step_metrics(trainer, scores, rewards, lengths, truncated, batch, flat_groups, train_out,
                             t_rollout, t_train, cfg)
        if (step + 1) % cfg.logging.every == 0 or step + 1 == t.steps:
            log.log(step + 1, last)
        bar.update(step + 1, last)
        if trainer.is_main:
            if step == start or (cfg.logging.sample_every and (step + 1) % cfg.logging.sample_every == 0):
                _print_samples(samples, sample_rows, scores, cfg, step + 1)
            if last["reward/max"] <= 0:
                _warn_zero_rewards(scores, samples, step + 1)
        if t.eval_every and eval_rows and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:  # last: below
            log.log(step + 1, held_out_accuracy(trainer, engine, eval_rows, cfg))
        done = step + 1
        if ckpt.save_if_due(trainer, run_dir, cfg, done, t.steps):
            bar.close()
            return {"stopped_at": done, **last}
    bar.close()
    ckpt.save(trainer, run_dir, t.steps, cfg.checkpoint.keep)
    result = dict(last)
    if eval_rows:
        ev = held_out_accuracy(trainer, engine, eval_rows, cfg)
        log.log(t.steps, ev)
        result.update(ev)
    if cfg.checkpoint.export_hf:
        trainer.export_hf(run_dir / "hf")
    log.close()
    return result


def _optimize(trainer, batch, cfg: Config, step: int) -> dict:
    """mu passes over the batch in shuffled mini-batches; each normalised by its global size."""
    g = cfg.grpo
    n_local = len(batch)
    mini_local = (g.mini_batch_size // trainer.world_size) if g.mini_batch_size else n_local
    rng = random.Random(cfg.train.seed * 7919 + step)
    mask = batch.completion_mask() * batch.loss_weight.unsqueeze(-1)
    acc: dict[str, float] = {}
    steps = 0
    for _ in range(g.mu):
        order = list(range(n_local))
        if mini_local < n_local:
            rng.shuffle(order)
        for s in range(0, n_local, mini_local):
            mb = order[s: s + mini_local]
            seqs = trainer.all_reduce_sum(float(batch.loss_weight[mb].sum()))
            tokens = trainer.all_reduce_sum(float(mask[mb].sum()))
            out = trainer.grpo_step(batch.select(mb), max(seqs, 1.0), max(tokens, 1.0))
            for k, v in out.items():
                acc[k] = acc.get(k, 0.0) + v
            steps += 1
    out = {k: v / steps for k, v in acc.items()}
    out["skipped"] = float(acc.get("skipped", 0.0) > 0)
    out["train_tokens"] = trainer.all_reduce_sum(float(sum(len(p) + len(c) for p, c in
                                                            zip(batch.prompt_ids, batch.completion_ids)))) * g.mu
    return out


def _step_metrics(trainer, scores, rewards, lengths, truncated, batch, flat_groups, train_out,
                  t_rollout, t_train, cfg) -> dict:
    local = {
        "rewards": rewards.tolist(),
        "components": scores.components,
        "failures": scores.failures,
        "lengths": lengths.tolist(),
        "truncated": truncated.tolist(),
        "adv": batch.advantages.tolist(),
        "flat": flat_groups.tolist(),
    }
    parts = trainer.all_gather(local)
    cat = lambda k: [x for p in parts for x in p[k]]  # noqa: E731
    rw, ln, adv = torch.tensor(cat("rewards")), torch.tensor(cat("lengths")).float(), torch.tensor(cat("adv"))
    out = {
        "reward/total": float(rw.mean()),
        "reward/max": float(rw.max()),
        "response_len/mean": float(ln.mean()),
        "response_len/max": float(ln.max()),
        "truncation_rate": float(torch.tensor(cat("truncated")).float().mean()),
        "adv_std": float(adv.std()) if adv.numel() > 1 else 0.0,
        "zero_var_groups": float(torch.tensor(cat("flat")).float().mean()),
        "rollout_tokens_per_s": float(ln.sum()) / max(1e-9, trainer.all_reduce_sum(t_rollout) / trainer.world_size),
        "train_tokens_per_s": train_out["train_tokens"] / max(1e-9, t_train),
    }
    for name in cfg.rewards.weights:
        out[f"reward/{name}"] = float(torch.tensor([x for p in parts for x in p["components"][name]]).mean())
        fails = sum(p["failures"].get(name, 0) for p in parts)
        if fails:
            out[f"reward_failures/{name}"] = float(fails)
    for k in ("loss", "kl", "clip_frac", "entropy", "grad_norm", "lr", "skipped"):
        if k in train_out:
            out[k] = float(train_out[k])
    return out


def _print_samples(samples, rows, scores, cfg: Config, step: int) -> None:
    from rich.panel import Panel

    for i in range(min(cfg.logging.samples_to_print, len(samples))):
        comps = "  ".join(f"{n}={scores.components[n][i]:.2f}" for n in scores.components)
        body = f"[dim]answer: {rows[i].get(cfg.data.answer_field)}[/dim]\n{samples[i].text}"
        console.print(Panel(body, title=f"step {step} sample {i}  {comps}", expand=False))


def _warn_zero_rewards(scores, samples, step: int) -> None:
    from r1cli.rewards import extract_answer

    no_answer = sum(extract_answer(c.text) is None for c in samples)
    lines = [f"[bold red]step {step}: every reward is 0[/bold red] — nothing to learn from this batch."]
    for name, vals in scores.components.items():
        why = f"; {scores.failures[name]} raised, last: {scores.last_error[name]}" if name in scores.failures else ""
        lines.append(f"  {name}: {sum(v > 0 for v in vals)}/{len(vals)} samples scored{why}")
    lines.append(f"  {no_answer}/{len(samples)} completions have no <answer>…</answer> or \\boxed{{}} to check")
    console.print("\n".join(lines))
