"""`r1 rl`: the GRPO loop, top to bottom.

Per step: prompts -> G samples each -> rewards -> old/ref log-probs -> advantages
(group-relative; or, with grpo.advantage=gae, GAE over a learned critic's values) ->
mu passes of clipped-objective mini-batch steps (and the critic's value-loss steps) ->
new weights to the rollout engine. It talks only to a trainer backend, a rollout
engine and their parallel context (r1cli/interfaces.py) and never imports
torch.distributed, megatron or vllm.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from r1cli.config import Config
from r1cli.data.prompts import encode_prompts, fit_prompts
from r1cli.data.records import read_data
from r1cli.data.schedule import RowSchedule
from r1cli.errors import R1Error
from r1cli.eval.accuracy import held_out_evaluator
from r1cli.interfaces import (
    Completion,
    SamplingParams,
    build_critic,
    build_engine,
    build_trainer,
    engine_reports_logprobs,
    pick_engine,
)
from r1cli.models.loading import context_length
from r1cli.rewards import REWARDS, RewardContext, Scores, check_task_rows, score
from r1cli.rl.advantages import (
    ADVANTAGES,
    equal_reward_groups,
    final_token_rewards,
    gae,
    group_advantages,
    overlong_penalty,
    token_returns,
    whiten_batch,
)
from r1cli.rl.critic import ValueLoss, WithCritic
from r1cli.rl.losses import kl_penalty
from r1cli.rl.mismatch import engine_logprobs, mis_keep, mismatch_sums, tis_weights
from r1cli.rl.objective import GRPOLoss, GRPOObjective
from r1cli.rl.stream import RolloutStream
from r1cli.run.console import console
from r1cli.run.harness import RunHarness, check_run_dir
from r1cli.seeds import minibatch_seed, refill_seed, sample_seed
from r1cli.token_batch import TokenBatch, balance_ranks
from r1cli.tools import with_tool_schemas
from r1cli.tools.turns import with_tools


def validate(cfg: Config) -> None:
    """What no single section can check alone, before any model loads."""
    g, r = cfg.grpo, cfg.rollout
    critic = needs_critic(cfg)
    if r.n < 2 and not critic:
        raise R1Error("rollout.n must be at least 2: advantages are relative to the group (one sample has none); "
                      "grpo.advantage=gae takes its baseline from a learned critic instead")
    if critic:
        if cfg.parallel.backend != "torch":
            raise R1Error(f"grpo.advantage=gae trains a critic on parallel.backend=torch; {cfg.parallel.backend} "
                          "holds no value model yet")
        if cfg.model.lora.rank:
            raise R1Error("grpo.advantage=gae with model.lora is not built (the critic would need its own adapters "
                          "and a trainable value head): train the policy in full, or use a group baseline")
        if cfg.parallel.context_parallel > 1:
            raise R1Error("grpo.advantage=gae with parallel.context_parallel > 1 is not built (the value loss takes "
                          "whole rows' hidden states): use parallel.context_parallel=1 or a group baseline")
        if r.n < 2 and (g.drop_equal_groups or g.dynamic_sampling):
            raise R1Error("grpo.drop_equal_groups and grpo.dynamic_sampling drop groups whose rewards are all equal: "
                          "with rollout.n=1 that is every group; use rollout.n >= 2 or drop them")
    if getattr(ADVANTAGES.get(g.advantage), "divides_by_std", False) and g.adv_eps <= 0:
        raise R1Error(f"grpo.adv_eps=0 with grpo.advantage={g.advantage}: a group whose rewards are all equal "
                      "divides 0 by 0 (NaN advantages); use a small positive grpo.adv_eps such as 1e-6")
    if cfg.parallel.torch.fused_linear == "one_pass" and g.ratio_level != "token":
        raise R1Error("parallel.torch.fused_linear=one_pass applies token-level ratios; grpo.ratio_level=sequence "
                      "needs parallel.torch.fused_linear=recompute")
    m = cfg.model
    if m.routing_replay != "off":
        engine = pick_engine(r.engine)
        why = ("parallel.backend=torch" if cfg.parallel.backend != "torch" else
               "rollout.engine=hf or vllm (vLLM on a GPU)" if engine not in ("hf", "vllm") else
               "parallel.context_parallel=1" if cfg.parallel.context_parallel > 1 else
               "no rollout.tools (a tool's turns would need their routing stitched)" if r.tools else
               "rollout.max_staleness=0 (the worker's samples carry no routing yet)" if r.max_staleness else "")
        if why:
            raise R1Error(f"model.routing_replay={m.routing_replay} is built for {why}; set model.routing_replay=off")
    reports = engine_reports_logprobs(r.engine) or m.routing_replay != "off"  # the engine's own log-probs
    if r.mis_level != "token" and not r.mis_low:  # read only with the mask on: refused, not ignored
        raise R1Error("rollout.mis_level is read only with masked importance sampling: set rollout.mis_low and "
                      "rollout.mis_high (e.g. 0.5 and 2.0), or drop rollout.mis_level")
    if (r.mis_low or r.mis_high) and not 0 < r.mis_low < 1 < r.mis_high:
        raise R1Error(f"rollout.mis_low and rollout.mis_high bound the ratio p_trainer / p_engine a token keeps: "
                      f"0 < mis_low < 1 < mis_high (e.g. 0.5 and 2.0); this run has {r.mis_low} and {r.mis_high}")
    if r.mis_low and not (reports or r.asynchronous or r.max_staleness):
        raise R1Error(f"rollout.mis_low/mis_high mask tokens where the engine sampled from another distribution than "
                      f"the trainer's (vllm, or older weights: rollout.asynchronous, rollout.max_staleness); the "
                      f"{pick_engine(r.engine)} engine reports no log-probs of its own")
    if r.tis_cap and not (reports or r.asynchronous or r.max_staleness):
        raise R1Error(f"rollout.tis_cap corrects for an engine that samples from other kernels than the trainer's "
                      f"(vllm) or from older weights (rollout.asynchronous, rollout.max_staleness); the "
                      f"{pick_engine(r.engine)} engine reports no log-probs of its own")
    if r.asynchronous and not r.tis_cap:
        raise R1Error("rollout.asynchronous trains on samples generated one update earlier: set rollout.tis_cap "
                      "(e.g. 2.0), which weights each token by the current policy's probability over the engine's")
    if r.max_staleness:
        if r.asynchronous:
            raise R1Error("rollout.max_staleness (a rollout worker process, up to K steps ahead) and "
                          "rollout.asynchronous (one step ahead, in a thread) are two ways of generating ahead: "
                          "choose one")
        if not r.tis_cap:
            raise R1Error("rollout.max_staleness trains on samples generated up to K updates earlier: set "
                          "rollout.tis_cap (e.g. 2.0), which weights each token by the current policy's probability "
                          "over the worker's")
        if g.dynamic_sampling:
            raise R1Error("grpo.dynamic_sampling decides refill rounds from the step's rewards, which a worker "
                          "generating ahead cannot know: use rollout.max_staleness=0 with it")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise R1Error("rollout.max_staleness runs one trainer process beside one rollout worker; it is not "
                          "built for torchrun's several processes yet")
    if r.partial and not r.max_staleness:
        raise R1Error("rollout.partial continues generations under newer weights: it needs rollout.max_staleness")
    default = type(r)()
    if not r.partial and (r.partial_tokens, r.partial_rows) != (default.partial_tokens, default.partial_rows):
        raise R1Error("rollout.partial_tokens and rollout.partial_rows size rollout.partial's pieces: set "
                      "rollout.partial=true, or drop them")
    if r.partial and r.tools:
        raise R1Error("rollout.partial with rollout.tools is not built (a turn's pieces and a tool's output)")
    if r.asynchronous and (cfg.parallel.tensor_parallel > 1 or cfg.parallel.pipeline_parallel > 1):
        raise R1Error("rollout.asynchronous generates in a thread beside the trainer, which cannot share samples "
                      "across the ranks of a tensor- or pipeline-parallel replica; use data parallelism")


def needs_critic(cfg: Config) -> bool:
    """Whether the advantage estimator takes a learned critic's values (grpo.advantage=gae)."""
    return bool(getattr(ADVANTAGES.get(cfg.grpo.advantage), "needs_critic", False))


def validate_layout(cfg: Config, dp_size: int) -> None:
    g = cfg.grpo
    if g.prompts_per_step % dp_size:
        raise R1Error(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of the {dp_size} "
                      "data-parallel ranks")
    seqs = g.prompts_per_step * cfg.rollout.n
    if cfg.rollout.asynchronous and g.dynamic_sampling and dp_size > 1:
        raise R1Error("grpo.dynamic_sampling with rollout.asynchronous and several data-parallel ranks would agree "
                      "on refill rounds from the generation thread; use one of the two")
    if g.mini_batch_size and (seqs % g.mini_batch_size or g.mini_batch_size % dp_size):
        raise R1Error(f"grpo.mini_batch_size={g.mini_batch_size} must divide the {seqs} samples per step "
                      f"and be a multiple of the {dp_size} data-parallel ranks")


def run_rl(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    validate(cfg)  # before reading data or loading a model
    check_run_dir(cfg, resume, overwrite)
    rows = read_data(cfg.data.train, cfg.data, cfg.data.max_samples)
    if any(getattr(REWARDS.get(name), "needs_answer", False) for name in cfg.rewards.weights):
        rows.require(cfg.data.answer_field, "data.answer_field")  # else every sample would silently score 0
    if "accuracy" in cfg.rewards.weights:
        check_task_rows(rows, cfg.data.task_field, cfg.data.answer_field)
    g, t = cfg.grpo, cfg.train
    objective = GRPOObjective.from_config(g, cfg.rollout.temperature, cfg.rollout.max_new_tokens)
    trainer = build_trainer(cfg, need_reference=g.beta > 0, command="rl")
    critic = build_critic(cfg, trainer) if needs_critic(cfg) else None  # PPO's value model, beside the policy
    p = trainer.parallel
    validate_layout(cfg, p.dp_size)
    engine = with_tools(build_engine(cfg.model, cfg.rollout, trainer), trainer.tokenizer, cfg.rollout, cfg.data)
    prompts = encode_prompts(trainer.tokenizer, rows, with_tool_schemas(cfg.data, cfg.rollout))
    limit = cfg.data.max_prompt_tokens or (context_length(cfg.model.path) or 1 << 62) - cfg.rollout.max_new_tokens
    rows, prompts, dropped = fit_prompts(rows, prompts, limit, cfg.data.long_prompts)
    if dropped and p.is_main:
        console.print(f"dropped {dropped} of {dropped + len(rows)} prompts longer than {limit} tokens "
                      "(data.max_prompt_tokens; data.long_prompts=error to stop instead)")
    schedule = RowSchedule(len(rows), g.prompts_per_step, t.seed, cfg.data.shuffle)
    refill = RowSchedule(len(rows), g.prompts_per_step, refill_seed(t.seed), cfg.data.shuffle)
    ctx = RewardContext.from_config(cfg.data, cfg.rewards)
    keys = [("reward/total", "reward"), ("reward/accuracy", "acc"), ("response_len/mean", "len"), ("kl", "kl"),
            ("rollout_tokens_per_s", "tok/s"), ("moe/load_imbalance", "moe imb")]
    if critic is not None:
        keys.append(("critic/value_loss", "V loss"))
    ahead = ThreadPoolExecutor(1, thread_name_prefix="r1-rollout") if cfg.rollout.asynchronous else None
    saved = trainer if critic is None else WithCritic(trainer, critic)  # what a checkpoint holds
    with RunHarness(cfg, saved, resume=resume, overwrite=overwrite, progress_keys=keys, eval_before=True,
                    evaluate=held_out_evaluator(cfg, trainer, engine)) as harness, ahead or nullcontext(), \
            ExitStack() as stack:
        if harness.start:  # resumed: an engine with its own copy still holds the starting weights
            engine.load_weights(trainer.named_weights())
        # rollout.asynchronous: the next step's samples, generated while this step trains (a checkpoint keeps them,
        # so that a resumed run trains on what the uninterrupted one would have)
        pending: Future | None = None
        stream = None
        if cfg.rollout.max_staleness:  # fully asynchronous: a worker process generates up to K steps ahead
            stream = stack.enter_context(RolloutStream(cfg, lambda s: step_job(prompts, schedule, s, cfg),
                                                       harness.start, trainer.named_weights, harness.carried))
            harness.carry = stream.carry
        else:
            pending = _done(harness.carried) if harness.carried is not None else None
            harness.carry = (lambda: pending.result() if pending is not None else None) if ahead else None
        bad_streak = 0
        last: dict = {}
        for step in range(harness.start, t.steps):
            # 1-2. G samples per prompt and their rewards (a failing checker is that sample's 0); with dynamic
            # sampling, rounds of further prompts replace groups without signal. Asynchronous: generated during the
            # last step by the weights before its update (version step - 1), and the next step's start now. Fully
            # asynchronous: generated by the worker under version step - K
            if stream is not None:
                rollout, scored, sampling = streamed_step(stream, rows, schedule, step, cfg, ctx)
            elif pending is None:
                rollout, scored, sampling = sample_step(engine, rows, prompts, schedule, refill, step, cfg, p, ctx)
            else:
                rollout, scored, sampling = pending.result()
            sampling = {"rollout/staleness": float(step - rollout.version), **sampling}
            if ahead is not None and step + 1 < t.steps:
                pending = ahead.submit(sample_step, engine, rows, prompts, schedule, refill, step + 1, cfg, p, ctx,
                                       version=step)
            else:
                pending = None
                engine.sleep()  # the trainer's turn (vLLM on GPU frees its KV cache; the next generate wakes it)
            routing = [c.routing for c in rollout.samples]  # model.routing_replay: the engine's experts per token
            batch = TokenBatch.from_completions([c.prompt_ids for c in rollout.samples],
                                                [c.completion_ids for c in rollout.samples],
                                                [c.observation for c in rollout.samples],  # tool output: unscored
                                                None if any(r is None for r in routing) else routing)
            t1 = time.perf_counter()
            behaviour = add_logprobs(trainer, batch, rollout, scored, objective, cfg)  # 3. old / reference log-probs
            if critic is not None:  # and the critic's values of each state
                batch.fields["old_values"] = critic.values(batch)
            shaped = add_advantages(batch, scored, behaviour, cfg, trainer.parallel.all_gather)  # 4. advantages
            train_out = optimize(trainer, batch, objective, cfg, step, critic)  # 5. mu passes of mini-batch steps
            t_train = time.perf_counter() - t1
            if pending is not None:  # the engine finishes the next step's samples before new weights reach it
                t2 = time.perf_counter()
                pending.result()
                sampling["time/rollout_wait_s"] = time.perf_counter() - t2
            engine.load_weights(trainer.named_weights())
            if stream is not None:
                stream.publish(step + 1)
            if g.ref_update_every and (step + 1) % g.ref_update_every == 0:
                trainer.update_reference()

            # 6. metrics, samples, checkpoint
            bad_streak = bad_streak + 1 if train_out["skipped"] else 0
            if bad_streak >= g.max_bad_steps:
                raise R1Error(f"stopping at step {step + 1}: {bad_streak} steps in a row had a non-finite loss or "
                              "gradient (lower optim.lr, check data); the last good checkpoint is in "
                              f"{harness.run_dir}")
            last = _step_metrics(p, scored, shaped, train_out, rollout.seconds, t_train, cfg)
            last.update(sampling)
            if stream is not None:  # the share of the step the trainer waited for the worker
                last["time/trainer_idle_share"] = sampling["time/rollout_wait_s"] / max(
                    1e-9, sampling["time/rollout_wait_s"] + t_train)
            if cfg.rollout.tools:
                last.update(tool_metrics(p, rollout, scored))
            last.update(_mismatch_metrics(p, behaviour.mismatch, shaped.tis, batch.scored_mask(),
                                          cfg.rollout.tis_cap, shaped.kept))
            if p.is_main:
                if step == harness.start or (cfg.logging.sample_every and (step + 1) % cfg.logging.sample_every == 0):
                    _print_samples(rollout.samples, rollout.rows, scored.scores, cfg, step + 1)
                    harness.log.log_samples(step + 1, _sample_table(rollout.samples, rollout.rows, scored.scores,
                                                                    cfg))
                if last["reward/max"] <= 0:
                    _warn_zero_rewards(scored.scores, rollout.samples, step + 1)
            if harness.step_done(step + 1, last):
                return harness.stopped(last)
        return harness.finish(last)


# ---------------------------------------------------------------- the stages of one step, in order


@dataclass
class Rollout:
    """1. This data-parallel rank's prompts of the step (the same on every TP/PP rank of its replica), G samples
    each, sample k of prompt q at k + q * G."""

    rows: list[dict]  # the data row of each sample
    samples: list[Completion]
    seconds: float  # generating them
    version: int = 0  # the updates the generating weights had taken (the step whose start they are)


@dataclass
class Scored:
    """2. Rule rewards of each sample."""

    scores: Scores  # per reward component, with failures
    rewards: torch.Tensor  # [S] weighted total, with the overlong penalty (and the KL penalty with kl_in_reward)
    lengths: torch.Tensor  # [S] completion tokens
    truncated: torch.Tensor  # [S] bool: hit max_new_tokens
    excluded: torch.Tensor | None = None  # [S] bool: dynamic sampling's filler groups, weighted 0 in the loss


@dataclass
class Behaviour:
    """3. What the engine's own log-probs say about how far off-policy the samples were (None without them)."""

    engine_logp: torch.Tensor | None  # [S, C]
    mismatch: dict | None  # sums for rollout/mismatch_kl
    reward_kl: torch.Tensor | None = None  # [S, C] per-token KL penalty for per-token returns (REINFORCE++)


@dataclass
class Shaped:
    """4. Group-relative advantages and which samples take part in the loss."""

    advantages: torch.Tensor  # [S] one per sample
    flat_groups: torch.Tensor  # [S / G] bool: every reward of the group equal (no signal)
    tis: torch.Tensor | None  # [S, C] truncated importance weights (rollout.tis_cap)
    kept: torch.Tensor | None = None  # [S, C] 1 where masked importance sampling keeps a token (rollout.mis_low)


def _done(value) -> Future:
    """A finished future holding `value` (an asynchronous run's samples, resumed from its checkpoint)."""
    f: Future = Future()
    f.set_result(value)
    return f


def sample_step(engine, rows, prompts, schedule: RowSchedule, refill: RowSchedule, step: int, cfg: Config, p,
                ctx: RewardContext, version: int | None = None) -> tuple[Rollout, Scored, dict]:
    """1-2. The step's samples and rewards. With grpo.dynamic_sampling (DAPO), groups whose rewards are all equal
    are set aside and further rounds of prompts_per_step prompts - chunk step * (rounds - 1) + r of their own seeded
    stream, so a resumed run draws the same - are generated until every rank holds its share of groups with signal
    or grpo.max_sampling_rounds rounds ran (all ranks run the same rounds); a rank still short fills up with groups
    without signal, weighted 0 in the loss. Metrics: sampling/rounds, sampling/groups_dropped, sampling/groups_short.
    `version`: the updates the engine's weights have taken (default: step, an on-policy engine)."""
    g, n = cfg.grpo, cfg.rollout.n
    rollout = generate(engine, rows, prompts, schedule.rows_for_step(step), step, 0, cfg, p)
    rollout.version = step if version is None else version
    scored = score_samples(rollout, cfg, ctx)
    if not g.dynamic_sampling:
        return rollout, scored, {}
    quota = g.prompts_per_step // p.dp_size
    parts = [(rollout, scored)]
    rounds = 1
    while rounds < g.max_sampling_rounds and p.all_reduce_max(quota - _signal_groups(parts, n)) > 0:
        idx = refill.rows_for_step(step * (g.max_sampling_rounds - 1) + rounds - 1)
        more = generate(engine, rows, prompts, idx, step, rounds, cfg, p)
        parts.append((more, score_samples(more, cfg, ctx)))
        rounds += 1
    # groups with signal in the order drawn, then (if short) groups without, which take no part in the loss
    groups = [(k, q, bool(flat)) for k, (_, sc) in enumerate(parts)
              for q, flat in enumerate(equal_reward_groups(sc.rewards, n).tolist())]
    chosen = ([x for x in groups if not x[2]] + [x for x in groups if x[2]])[:quota]
    short = sum(1 for x in chosen if x[2])
    rollout, scored = _take(parts, [(k, q) for k, q, _ in chosen], n)
    rollout.version = parts[0][0].version
    scored.excluded = torch.tensor([x[2] for x in chosen]).repeat_interleave(n)
    dropped = sum(1 for x in groups if x[2]) - short
    return rollout, scored, {"sampling/rounds": float(rounds),
                             "sampling/groups_dropped": p.all_reduce_sum(float(dropped)),
                             "sampling/groups_short": p.all_reduce_sum(float(short))}


def _signal_groups(parts: list, n: int) -> int:
    return sum(int((~equal_reward_groups(sc.rewards, n)).sum()) for _, sc in parts)


def _take(parts: list[tuple[Rollout, Scored]], chosen: list[tuple[int, int]], n: int) -> tuple[Rollout, Scored]:
    """One Rollout and Scored of the chosen groups (part k's group q), in that order."""
    def pick(seq, q):
        return seq[q * n: (q + 1) * n]

    rows = [r for k, q in chosen for r in pick(parts[k][0].rows, q)]
    samples = [c for k, q in chosen for c in pick(parts[k][0].samples, q)]
    seconds = sum(r.seconds for r, _ in parts)
    total = [v for k, q in chosen for v in pick(parts[k][1].scores.total, q)]
    names = parts[0][1].scores.components
    components = {name: [v for k, q in chosen for v in pick(parts[k][1].scores.components[name], q)]
                  for name in names}
    failures: dict[str, int] = {}
    last_error: dict[str, str] = {}
    for _, sc in parts:  # every round's failures count
        for name, c in sc.scores.failures.items():
            failures[name] = failures.get(name, 0) + c
        last_error.update(sc.scores.last_error)
    cat = lambda f: torch.cat([pick(getattr(parts[k][1], f), q) for k, q in chosen])  # noqa: E731
    scores = Scores(total, components, failures, last_error)
    return Rollout(rows, samples, seconds), Scored(scores, cat("rewards"), cat("lengths"), cat("truncated"))


def step_job(prompts, schedule: RowSchedule, step: int, cfg: Config):
    """A fully asynchronous run's job for step `step`: its prompts and sampling, seeded as generate() seeds them
    (one data-parallel rank)."""
    idx = schedule.rows_for_step(step)
    params = SamplingParams.from_rollout(cfg.rollout, seed=sample_seed(cfg.train.seed, step, 0))
    return [prompts[i] for i in idx], params


def streamed_step(stream: RolloutStream, rows, schedule: RowSchedule, step: int, cfg: Config,
                  ctx: RewardContext) -> tuple[Rollout, Scored, dict]:
    """1-2 of a fully asynchronous run: step `step`'s samples from the worker, their rewards; a sample whose oldest
    token is more than rollout.max_staleness updates old takes no part in the loss (counted)."""
    t0 = time.perf_counter()
    done = stream.take(step)
    n, K = cfg.rollout.n, cfg.rollout.max_staleness
    idx = schedule.rows_for_step(step)
    rollout = Rollout([rows[i] for i in idx for _ in range(n)], [c for grp in done.groups for c in grp],
                      done.seconds, version=min(v for v, _ in done.versions))
    scored = score_samples(rollout, cfg, ctx)
    lag = torch.tensor([step - oldest for oldest, _ in done.versions])
    scored.excluded = lag > K
    st = stream.stats
    busy = st.engine_busy_s + st.engine_idle_s
    out = {"rollout/staleness": float(lag.float().mean()), "rollout/staleness_max": float(lag.max()),
           "rollout/dropped": float((lag > K).sum()), "rollout/worker_restarts": float(st.restarts),
           "rollout/queue_depth": float(len(stream.finished)), "time/rollout_wait_s": st.wait_s,
           "rollout/refreshed": float(sum(newest > oldest for oldest, newest in done.versions)),
           "time/engine_idle_share": st.engine_idle_s / busy if busy else 0.0,
           "time/stream_take_s": time.perf_counter() - t0}
    out.update({f"rollout/staleness_{k}": float((lag == k).sum()) for k in range(K + 1)})
    return rollout, scored, out


def generate(engine, rows, prompts, idx: list[int], step: int, round_: int, cfg: Config, p) -> Rollout:
    """This rank's share of the prompts `idx` (a global batch of prompts_per_step), G samples each; round_ > 0:
    a dynamic-sampling round, seeded apart from the step's first."""
    per_rank = cfg.grpo.prompts_per_step // p.dp_size
    positions = range(p.dp_rank * per_rank, (p.dp_rank + 1) * per_rank)
    t0 = time.perf_counter()
    first = round_ * cfg.grpo.prompts_per_step + positions[0]
    params = SamplingParams.from_rollout(cfg.rollout, seed=sample_seed(cfg.train.seed, step, first))
    # one rank of each model replica generates (the others pass no prompts, which keeps an engine whose TP group
    # spans them in step), and the replica shares its samples
    mine = [prompts[idx[q]] for q in positions] if p.is_replica_leader else []
    groups = p.share_in_replica(engine.generate(mine, params))
    seconds = time.perf_counter() - t0
    return Rollout([rows[idx[q]] for q in positions for _ in range(cfg.rollout.n)],
                   [c for grp in groups for c in grp], seconds)


def score_samples(rollout: Rollout, cfg: Config, ctx: RewardContext) -> Scored:
    g = cfg.grpo
    scores = score([c.text for c in rollout.samples], rollout.rows, cfg.rewards.weights, ctx, cfg.rewards.timeout_s)
    lengths = torch.tensor([len(c.completion_ids) for c in rollout.samples])
    rewards = torch.tensor(scores.total, dtype=torch.float32)
    rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, g.overlong_buffer, g.overlong_penalty)
    return Scored(scores, rewards, lengths, torch.tensor([c.truncated for c in rollout.samples], dtype=torch.bool))


def add_logprobs(trainer, batch: TokenBatch, rollout: Rollout, scored: Scored, objective: GRPOObjective,
                 cfg: Config) -> Behaviour:
    """batch.fields old_logp (unless the update is on-policy: old_pass_needed) and ref_logp with a KL term [S, C];
    with grpo.kl_in_reward the sequence KL leaves the rewards instead."""
    g = cfg.grpo
    mask = batch.scored_mask()
    engine_logp = engine_logprobs([c.logprobs for c in rollout.samples], mask.shape[1])
    if g.beta > 0:
        batch.fields["ref_logp"] = trainer.logprobs(batch, "reference", objective.temperature)
    if not old_pass_needed(cfg):  # on-policy: the loss takes its own forward's log-probs as the old ones
        if engine_logp is not None:
            batch.fields["engine_logp"] = engine_logp  # the mismatch metric comes from that forward too
        return Behaviour(engine_logp, None)
    batch.fields["old_logp"] = trainer.logprobs(batch, "policy", objective.temperature)
    reward_kl = None
    if g.beta > 0 and g.kl_in_reward:
        kl_tok = kl_penalty(batch.fields["old_logp"], batch.fields["ref_logp"], g.kl_estimator) * mask
        if getattr(ADVANTAGES.get(g.advantage), "token_kl_returns", False):
            reward_kl = kl_tok  # per-token returns in add_advantages
        else:
            scored.rewards = scored.rewards - g.beta * kl_tok.sum(-1)
    mismatch = None if engine_logp is None else mismatch_sums(batch.fields["old_logp"], engine_logp, mask)
    return Behaviour(engine_logp, mismatch, reward_kl)


def old_pass_needed(cfg: Config) -> bool:
    """Whether the old policy's log-probs need their own no-grad forward before the update: always with
    grpo.old_logprobs=recompute; else only when the update is not the rollout's single on-policy step (several
    passes or mini-batches), or when something reads them before the loss (TIS weights, the KL in the reward) or a
    one-pass fused kernel needs them to form its gradient in the forward."""
    g = cfg.grpo
    whole = not g.mini_batch_size or g.mini_batch_size == g.prompts_per_step * cfg.rollout.n
    one_pass = cfg.parallel.backend == "torch" and cfg.parallel.torch.fused_linear == "one_pass"
    return (g.old_logprobs == "recompute" or g.mu > 1 or not whole or cfg.rollout.tis_cap > 0
            or cfg.rollout.mis_low > 0 or (g.beta > 0 and g.kl_in_reward) or one_pass)


def add_advantages(batch: TokenBatch, scored: Scored, behaviour: Behaviour, cfg: Config,
                   gather=lambda x: [x]) -> Shaped:
    """batch.fields advantages ([S], or [S, C] with TIS or per-token returns), loss_weight [S] and mask [S, C]:
    what GRPOLoss reads. Groups without signal (grpo.drop_equal_groups) and truncated samples
    (grpo.overlong_filter) weigh 0. gather: every data-parallel rank's value of a local one (the batch-normalised
    estimators' statistics span the whole step)."""
    g, n = cfg.grpo, cfg.rollout.n
    mask = batch.scored_mask()
    advantages = group_advantages(scored.rewards, n, g.advantage, g.adv_eps)
    flat_groups = equal_reward_groups(scored.rewards, n)
    weight = torch.ones(len(batch))
    if g.drop_equal_groups:
        weight = weight * (~flat_groups).repeat_interleave(n).float()
    if g.overlong_filter:
        weight = weight * (~scored.truncated).float()
    if scored.excluded is not None:
        weight = weight * (~scored.excluded).float()
    estimator = ADVANTAGES.get(g.advantage)
    if getattr(estimator, "needs_critic", False):  # PPO: GAE over the critic's values, returns for the critic
        c = cfg.critic
        token_r = final_token_rewards(scored.rewards, mask)
        if behaviour.reward_kl is not None:  # the KL penalty as a reward per token
            token_r = token_r - g.beta * behaviour.reward_kl
        advantages, returns = gae(token_r, batch.fields["old_values"], mask, c.gamma, c.lam)
        batch.fields.update(returns=returns, value_mask=mask * weight.unsqueeze(-1))
        if c.whiten:
            advantages = whiten_batch(advantages, mask * weight.unsqueeze(-1), g.adv_eps, gather)
    elif behaviour.reward_kl is not None:  # REINFORCE++: the KL penalty as per-token returns
        advantages = token_returns(scored.rewards, behaviour.reward_kl, g.beta, mask.float())
    if getattr(estimator, "batch_whitened", False):  # REINFORCE++: over every token of the step that trains
        advantages = whiten_batch(advantages, mask * weight.unsqueeze(-1), g.adv_eps, gather)
    token_adv, tis, kept = advantages, None, None
    if cfg.rollout.tis_cap and behaviour.engine_logp is not None:  # truncated importance sampling, per token
        tis = tis_weights(batch.fields["old_logp"], behaviour.engine_logp, mask, cfg.rollout.tis_cap)
        token_adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages) * tis
    if cfg.rollout.mis_low and behaviour.engine_logp is not None:  # masked importance sampling
        r = cfg.rollout
        kept = mis_keep(batch.fields["old_logp"], behaviour.engine_logp, mask, r.mis_low, r.mis_high, r.mis_level)
    loss_mask = mask * weight.unsqueeze(-1) * (1 if kept is None else kept)
    batch.fields.update(advantages=token_adv, loss_weight=weight, mask=loss_mask)
    # one per sample for the logs: a per-token return's value at the first token (the whole return)
    return Shaped(advantages if advantages.dim() == 1 else advantages[:, 0], flat_groups, tis, kept)


def optimize(trainer, batch: TokenBatch, objective: GRPOObjective, cfg: Config, step: int, critic=None) -> dict:
    """mu passes over the batch in shuffled mini-batches; each one optimizer step, normalised by its global size.
    With a critic each mini-batch also takes one critic step on the value loss (only that during the first
    critic.warmup_steps steps)."""
    g, p = cfg.grpo, trainer.parallel
    n_local = len(batch)
    mini_local = (g.mini_batch_size // p.dp_size) if g.mini_batch_size else n_local
    rng = random.Random(minibatch_seed(cfg.train.seed, step))
    weight, mask = batch.fields["loss_weight"], batch.fields["mask"]
    acc: dict[str, float] = {}
    steps = 0
    for _ in range(g.mu):
        order = list(range(n_local))
        if mini_local < n_local:
            rng.shuffle(order)
        for s in range(0, n_local, mini_local):
            mb = order[s: s + mini_local]
            seqs = p.all_reduce_sum(float(weight[mb].sum()))
            tokens = p.all_reduce_sum(float(mask[mb].sum()))
            part = batch.select(mb)
            if cfg.train.max_tokens_per_micro_batch and p.dp_size > 1:  # packed: every rank about as many tokens
                part = balance_ranks(part, p)
            out = {}
            if critic is None or step >= cfg.critic.warmup_steps:
                out = trainer.train_step(part, GRPOLoss(objective, max(seqs, 1.0), max(tokens, 1.0)))
            if critic is not None:
                value_tokens = p.all_reduce_sum(float(batch.fields["value_mask"][mb].sum()))
                c_out = critic.train_step(part, ValueLoss(cfg.critic.value_clip, max(value_tokens, 1.0)))
                out.update({k: v for k, v in c_out.items() if k.startswith("critic/")},
                           **{"critic/grad_norm": c_out["grad_norm"], "critic/skipped": c_out["skipped"]})
            for k, v in out.items():
                acc[k] = acc.get(k, 0.0) + v
            steps += 1
    out = {k: v / steps for k, v in acc.items()}
    out["skipped"] = float(acc.get("skipped", 0.0) > 0)
    out["train_tokens"] = p.all_reduce_sum(float(sum(len(r) for r in batch.input_ids))) * g.mu
    return out


def _step_metrics(parallel, scored: Scored, shaped: Shaped, train_out: dict, t_rollout: float, t_train: float,
                  cfg: Config) -> dict:
    local = {
        "rewards": scored.rewards.tolist(),
        "components": scored.scores.components,
        "failures": scored.scores.failures,
        "lengths": scored.lengths.tolist(),
        "truncated": scored.truncated.tolist(),
        "adv": shaped.advantages.tolist(),
        "flat": shaped.flat_groups.tolist(),
    }
    parts = parallel.all_gather(local)
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
        "rollout_tokens_per_s": float(ln.sum()) / max(1e-9, parallel.all_reduce_sum(t_rollout) / parallel.dp_size),
        "train_tokens_per_s": train_out["train_tokens"] / max(1e-9, t_train),
        "time/generate_s": t_rollout,  # rank 0's: generating (and sharing) the step's samples
        "time/train_s": t_train,  # its log-probs and optimizer steps
    }
    for name in cfg.rewards.weights:
        out[f"reward/{name}"] = float(torch.tensor([x for p in parts for x in p["components"][name]]).mean())
        fails = sum(p["failures"].get(name, 0) for p in parts)
        if fails:
            out[f"reward_failures/{name}"] = float(fails)
    for k in ("loss", "kl", "clip_frac", "entropy", "grad_norm", "lr", "skipped", "rollout/mismatch_kl",
              "rollout/mismatch_kl_max"):
        if k in train_out:
            out[k] = float(train_out[k])
    out.update({k: float(v) for k, v in train_out.items() if k.startswith("moe/")})  # a mixture of experts' routing
    out.update({k: float(v) for k, v in train_out.items() if k.startswith("critic/")})  # PPO's value model
    return out


def tool_metrics(parallel, rollout: Rollout, scored: Scored) -> dict:
    """Multi-turn rollouts over every rank: turns and tool calls per sample, the share of samples that called a tool,
    failed calls, and the share of correct samples (accuracy reward > 0) that called one."""
    acc = scored.scores.components.get("accuracy", [0.0] * len(rollout.samples))
    local = [(c.turns, c.tool_calls, c.tool_errors, float(a) > 0) for c, a in zip(rollout.samples, acc)]
    rows = [r for part in parallel.all_gather(local) for r in part]
    n, correct = max(1, len(rows)), [r for r in rows if r[3]]
    return {"tools/turns": sum(r[0] for r in rows) / n, "tools/calls": sum(r[1] for r in rows) / n,
            "tools/call_share": sum(r[1] > 0 for r in rows) / n, "tools/errors": float(sum(r[2] for r in rows)),
            "tools/correct_with_call": sum(r[1] > 0 for r in correct) / max(1, len(correct))}


def _mismatch_metrics(parallel, mismatch: dict | None, tis: torch.Tensor | None, mask: torch.Tensor,
                      cap: float, kept: torch.Tensor | None = None) -> dict:
    """rollout/mismatch_kl (mean per token) and rollout/mismatch_kl_max over every rank's tokens; with TIS the
    mean weight and the share of tokens whose weight the cap truncated; with MIS the share of tokens masked."""
    if mismatch is None:
        return {}
    local = dict(mismatch)
    if tis is not None:
        local.update(tis_sum=float((tis * mask).sum()), tis_capped=float(((tis >= cap) * mask).sum()))
    if kept is not None:
        local.update(mis_masked=float(((1 - kept) * mask).sum()))
    parts = parallel.all_gather(local)
    count = max(1.0, sum(x["count"] for x in parts))
    out = {"rollout/mismatch_kl": sum(x["sum"] for x in parts) / count,
           "rollout/mismatch_kl_max": max(x["max"] for x in parts)}
    if tis is not None:
        out["rollout/tis_weight"] = sum(x["tis_sum"] for x in parts) / count
        out["rollout/tis_capped"] = sum(x["tis_capped"] for x in parts) / count
    if kept is not None:
        out["rollout/mis_masked"] = sum(x["mis_masked"] for x in parts) / count
    return out


def _print_samples(samples, rows, scores, cfg: Config, step: int) -> None:
    from rich.panel import Panel

    for i in range(min(cfg.logging.samples_to_print, len(samples))):
        comps = "  ".join(f"{n}={scores.components[n][i]:.2f}" for n in scores.components)
        body = f"[dim]answer: {rows[i].get(cfg.data.answer_field)}[/dim]\n{samples[i].text}"
        console.print(Panel(body, title=f"step {step} sample {i}  {comps}", expand=False))


def _sample_table(samples, rows, scores, cfg: Config, limit: int = 16) -> list[dict]:
    """The step's first samples as table rows for the loggers: prompt, completion, answer, each reward."""
    from r1cli.data.templates import prompt_text

    out = []
    for i in range(min(limit, len(samples))):
        row = {"prompt": prompt_text(rows[i], cfg.data), "completion": samples[i].text,
               "answer": str(rows[i].get(cfg.data.answer_field, "")), "reward": scores.total[i]}
        row.update({f"reward/{n}": scores.components[n][i] for n in scores.components})
        out.append(row)
    return out


def _warn_zero_rewards(scores, samples, step: int) -> None:
    from r1cli.rewards import extract_answer

    no_answer = sum(extract_answer(c.text) is None for c in samples)
    lines = [f"[bold red]step {step}: every reward is 0[/bold red] — nothing to learn from this batch."]
    for name, vals in scores.components.items():
        why = f"; {scores.failures[name]} raised, last: {scores.last_error[name]}" if name in scores.failures else ""
        lines.append(f"  {name}: {sum(v > 0 for v in vals)}/{len(vals)} samples scored{why}")
    lines.append(f"  {no_answer}/{len(samples)} completions have no <answer>…</answer> or \\boxed{{}} to check")
    console.print("\n".join(lines))
