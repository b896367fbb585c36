"""Fully asynchronous rollouts (rollout.max_staleness: K): a rollout worker process generates while the trainer trains.

The worker holds its own engine (transformers or vLLM, built from model.path as `r1 sample` builds one) and works
through the run's prompt schedule step by step: G samples for each of a step's prompts, seeded exactly as the
synchronous loop seeds them. Step s is generated under the weights of version v(s) = max(0, s - K) (the weights
after v updates): the trainer publishes every version after its update, the worker starts step s once v(s) has
arrived, and the trainer takes step s's samples, finished in the meantime, when it gets there. Generation thus runs
beside training up to K steps ahead, every sample is min(s, K) updates old - corrected by TIS against the worker's
own log-probs - and the stream is a function of the seeds: a run stopped and resumed trains on the uninterrupted
run's samples (the checkpoint keeps the finished steps whose weights it no longer has).

With rollout.partial a sample is generated in pieces of rollout.partial_tokens tokens and, between pieces, the worker
takes up any newer version that has arrived (never one newer than the step's own): long answers finish under fresher
weights. Which token saw which version then depends on timing, so partial runs are not bit-reproducible; each
token's version is recorded (a sample's oldest one gives its staleness, and one older than K would be dropped).

A worker that dies is started again (rollout/worker_restarts) and its unfinished steps are generated again under the
newest weights (the stream is exact until then); one that cannot start is one line; every wait on it ends after
rollout.timeout_s.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass

from r1cli.errors import R1Error

POLL_S = 0.2  # how often a waiting trainer looks at whether the worker is alive


@dataclass
class Job:
    step: int
    prompts: list[list[int]]
    params: object  # SamplingParams
    version: int  # the weights it is generated under (partial: the oldest)


@dataclass
class Finished:
    """A step's samples from the worker: G per prompt, each with its tokens' weight versions (oldest, newest)."""

    step: int
    groups: list  # list[list[Completion]]
    versions: list[tuple[int, int]]  # per sample, in group order
    seconds: float  # generating them
    idle_s: float = 0.0  # the worker's wait for this job (weights or the job itself)


# ------------------------------------------------------------------ the worker


def worker_threads() -> int:
    """On the CPU the worker takes half the cores and the trainer the rest (two busy processes that each took them
    all would slow each other down many times over)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _share_the_cores() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - worker_threads())))


def worker_main(model_cfg, rollout_cfg, data_cfg, inbox, outbox) -> None:
    """The worker process: build the engine, then answer jobs in order under the version each names."""
    try:
        import torch

        torch.set_num_threads(min(int(os.environ.get("OMP_NUM_THREADS", "0")) or worker_threads(),
                                  worker_threads()))
        from r1cli.interfaces import build_engine
        from r1cli.models.loading import load_tokenizer
        from r1cli.tools.turns import with_tools

        if os.environ.get("R1_FAULT_WORKER_START"):  # a test's injection
            raise RuntimeError("R1_FAULT_WORKER_START is set")
        tokenizer = load_tokenizer(model_cfg.path)
        engine = with_tools(build_engine(model_cfg, rollout_cfg), tokenizer, rollout_cfg, data_cfg)
    except Exception as e:  # reported to the trainer as one line
        outbox.put(("error", f"{type(e).__name__}: {e}"))
        return
    outbox.put(("ready", os.getpid()))
    worker = Worker(engine, rollout_cfg, inbox, outbox, tokenizer)
    worker.run_partial() if rollout_cfg.partial else worker.run()


class Worker:
    def __init__(self, engine, rollout_cfg, inbox, outbox, tokenizer):
        self.engine, self.cfg, self.inbox, self.outbox, self.tok = engine, rollout_cfg, inbox, outbox, tokenizer
        self.waiting: list = []  # messages read ahead of their turn (partial runs look at the inbox mid-job)
        self.versions: dict[int, list] = {}  # published weights not applied yet
        self.applied = -1

    def _next(self, block: bool = True):
        if self.waiting:
            return self.waiting.pop(0)
        return self.inbox.get() if block else self.inbox.get_nowait()

    def run(self) -> None:
        idle_since = time.perf_counter()
        while True:
            msg = self._next()
            if msg[0] == "stop":
                return
            if msg[0] == "weights":
                self.versions[msg[1]] = msg[2]
                continue
            job: Job = msg[1]
            while job.version not in self.versions and self.applied != job.version:
                msg = self.inbox.get()  # the weights it needs are on their way
                if msg[0] == "weights":
                    self.versions[msg[1]] = msg[2]
                else:
                    self.waiting.append(msg)
            self._apply(job.version)
            idle = time.perf_counter() - idle_since
            time.sleep(float(os.environ.get("R1_FAULT_WORKER_SLEEP_S", "0")))  # a test's slow worker
            t0 = time.perf_counter()
            groups, versions = self._generate(job)
            self.outbox.put(("finished", Finished(job.step, groups, versions, time.perf_counter() - t0, idle)))
            idle_since = time.perf_counter()

    def _apply(self, version: int) -> None:
        if version != self.applied:
            self.engine.load_weights(self.versions.pop(version))
            self.applied = version
        for old in [v for v in self.versions if v < version]:
            del self.versions[old]

    def _generate(self, job: Job):
        groups = self.engine.generate(job.prompts, job.params)
        return groups, [(job.version, job.version) for g in groups for _ in g]

    # ------------------------------------------------------------------ rollout.partial
    def run_partial(self) -> None:
        """Continuous generation in pieces: a pool of up to rollout.partial_rows samples, from as many steps as
        have arrived, each piece of rollout.partial_tokens tokens generated for the whole pool under the newest
        weights that have arrived (a sample of step s never sees a version above s: the trainer publishes s + 1
        only after training on step s); a sample leaves the pool when it ends, a step's samples go back together
        once all have, and the pool refills from the next steps. A long answer thus no longer holds up the short
        ones beside it, and finishes under fresher weights."""
        pool: list[_Row] = []
        rows_of: dict[int, list[_Row]] = {}
        started: dict[int, float] = {}
        jobs: list[Job] = []
        piece = 0
        idle_since = time.perf_counter()
        while True:
            block = not pool and not jobs  # nothing to do: wait for the next message
            for msg in self._drain(block):
                if msg[0] == "stop":
                    return
                if msg[0] == "weights":
                    self.versions[msg[1]] = msg[2]
                else:
                    jobs.append(msg[1])
            if self.versions:
                self._apply(max(self.versions))
            while jobs and len(pool) + len(jobs[0].prompts) * jobs[0].params.n <= max(self.cfg.partial_rows, 1) \
                    or jobs and not pool:
                job = jobs.pop(0)
                rows = [_Row(job, q, j, list(p)) for q, p in enumerate(job.prompts) for j in range(job.params.n)]
                rows_of[job.step] = rows
                started[job.step] = time.perf_counter()
                pool += rows
            if not pool:
                continue
            idle = time.perf_counter() - idle_since
            time.sleep(float(os.environ.get("R1_FAULT_PIECE_SLEEP_S", "0")))  # a test's slow pieces
            self._piece(pool, piece)
            piece += 1
            idle_since = time.perf_counter()
            pool = [r for r in pool if not r.done]
            for step in sorted(rows_of):
                if all(r.done for r in rows_of[step]):
                    rows = rows_of.pop(step)
                    groups = [[r.completion(self.tok) for r in rows[q * rows[0].job.params.n:
                                                                       (q + 1) * rows[0].job.params.n]]
                              for q in range(len(rows[0].job.prompts))]
                    versions = [(min(r.versions), max(r.versions)) for r in rows]
                    self.outbox.put(("finished", Finished(step, groups, versions,
                                                          time.perf_counter() - started.pop(step), idle)))
                    idle = 0.0

    def _drain(self, block: bool) -> list:
        out = self.waiting
        self.waiting = []
        if block and not out:
            out.append(self.inbox.get())
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _piece(self, pool: list["_Row"], k: int) -> None:
        """One piece for every sample of the pool, in one call (n = 1 each, its prompt and tokens so far as the
        prompt), under the applied weights."""
        from dataclasses import replace

        params = replace(pool[0].job.params, n=1, max_tokens=self.cfg.partial_tokens, rows_per_call=len(pool),
                         seed=pool[0].job.params.seed + 7919 * k)
        out = self.engine.generate([r.prompt + r.ids for r in pool], params)
        for r, (c,) in zip(pool, out):
            r.add(c, self.applied, self.tok)


class _Row:
    """A sample of a partial run's pool: its tokens so far, their engine log-probs and weight versions."""

    def __init__(self, job: Job, q: int, j: int, prompt: list[int]):
        self.job, self.q, self.j, self.prompt = job, q, j, prompt
        self.ids: list[int] = []
        self.logprobs: list[float] | None = []
        self.versions: list[int] = []
        self.done = False
        self.reason = "length"

    def add(self, c, version: int, tok) -> None:
        self.ids += c.completion_ids
        self.logprobs = None if c.logprobs is None or self.logprobs is None else self.logprobs + list(c.logprobs)
        self.versions += [version] * len(c.completion_ids)
        stops = self.job.params.stop
        text = tok.decode(self.ids, skip_special_tokens=False)
        if c.finish_reason == "stop" or any(st in text for st in stops):
            self.done, self.reason = True, "stop"
            self._cut(tok, stops)
        elif len(self.ids) >= self.job.params.max_tokens:
            self.done = True
            self._keep(self.job.params.max_tokens)

    def _cut(self, tok, stops) -> None:
        """At the end of the first stop string (one that spans two pieces too), or at EOS."""
        cut = len(self.ids)
        if tok.eos_token_id in self.ids:
            cut = self.ids.index(tok.eos_token_id) + 1
        while cut > 1 and any(st in tok.decode(self.ids[: cut - 1], skip_special_tokens=False) for st in stops):
            cut -= 1
        self._keep(cut)

    def _keep(self, n: int) -> None:
        self.ids, self.versions = self.ids[:n], self.versions[:n]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[:n]

    def completion(self, tok):
        from r1cli.interfaces import Completion

        if not self.versions:
            self.versions = [self.job.version]
        return Completion(list(self.prompt), self.ids, tok.decode(self.ids, skip_special_tokens=True), self.reason,
                          self.logprobs)


# ------------------------------------------------------------------ the trainer's side


@dataclass
class StreamStats:
    restarts: int = 0
    dropped: int = 0
    wait_s: float = 0.0  # the trainer waiting for samples, this step
    engine_idle_s: float = 0.0
    engine_busy_s: float = 0.0


class RolloutStream:
    """The trainer's end: publishes weights, hands the worker its jobs in schedule order, takes finished steps."""

    def __init__(self, cfg, make_job, start: int, weights, carried: dict | None = None):
        """`make_job(step)` -> (prompts, SamplingParams) of a step (the synchronous loop's seeds); `start`: the first
        step to train; `weights()`: the trainer's weights now, version `start`; `carried`: the finished steps a
        checkpoint kept."""
        self.cfg, self.make_job, self.weights = cfg, make_job, weights
        self.K = cfg.rollout.max_staleness
        self.steps = cfg.train.steps
        self.finished: dict[int, Finished] = dict(carried or {})
        self.next_take = start
        self.sent = max([start - 1, *self.finished])  # the last step handed out (or carried)
        self.version = start
        self.stats = StreamStats()
        self.proc = None
        _share_the_cores()
        self._start_worker()
        self.publish(start)

    # ------------------------------------------------------------------ the worker's life
    def _start_worker(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        r = self.cfg.rollout
        self.proc = ctx.Process(target=worker_main, args=(self.cfg.model, r, self.cfg.data, self.inbox, self.outbox),
                                daemon=True, name="r1-rollout-worker")
        self.proc.start()
        msg = self._get(r.start_timeout_s, "start (rollout.start_timeout_s)", starting=True)
        if msg[0] == "error":
            raise R1Error(f"the rollout worker could not start: {msg[1]}")

    def _get(self, limit: float, what: str, starting: bool = False):
        deadline = time.perf_counter() + (limit or float("inf"))
        while True:
            try:
                return self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if not self.proc.is_alive():
                if starting:
                    raise R1Error(f"the rollout worker could not start: it exited with code {self.proc.exitcode}")
                raise _WorkerDied()
            if time.perf_counter() > deadline:
                raise R1Error(f"the rollout worker did not {what} within {limit:g} s")

    def _restart(self) -> None:
        """The worker died: a new one, the current weights, and every step handed out but not finished handed out
        again under them (the older weights they were due under are gone)."""
        self.stats.restarts += 1
        self.proc.join(timeout=1)
        self._start_worker()
        self.inbox.put(("weights", self.version, _shared(self.weights())))
        for step in range(self.next_take, self.sent + 1):
            if step not in self.finished:
                prompts, params = self.make_job(step)
                self.inbox.put(("job", Job(step, prompts, params, self.version)))

    # ------------------------------------------------------------------ the loop's calls
    def due_version(self, step: int) -> int:
        return max(0, step - self.K)

    def publish(self, version: int) -> None:
        """The trainer's weights, now `version` (after that many updates), to the worker, then every job that
        version opens (steps up to version + K)."""
        self.version = version
        self.inbox.put(("weights", version, _shared(self.weights())))
        while self.sent + 1 < self.steps and self.due_version(self.sent + 1) <= version:
            self.sent += 1
            prompts, params = self.make_job(self.sent)
            self.inbox.put(("job", Job(self.sent, prompts, params, self.due_version(self.sent))))

    def _wait(self, step: int) -> None:
        while step not in self.finished:
            try:
                msg = self._get(self.cfg.rollout.timeout_s, f"deliver step {step + 1}'s samples (rollout.timeout_s)")
            except _WorkerDied:
                self._restart()
                continue
            if msg[0] == "error":
                raise R1Error(f"the rollout worker failed: {msg[1]}")
            if msg[0] == "finished":
                f: Finished = msg[1]
                self.finished[f.step] = f
                self.stats.engine_idle_s += f.idle_s
                self.stats.engine_busy_s += f.seconds

    def take(self, step: int) -> Finished:
        """Step `step`'s samples, waiting for the worker (at most rollout.timeout_s at a time; a dead one is started
        again). The engine's busy and idle seconds count from the previous take."""
        t0 = time.perf_counter()
        self.stats.engine_idle_s = self.stats.engine_busy_s = 0.0
        self._wait(step)
        self.stats.wait_s = time.perf_counter() - t0
        self.next_take = step + 1
        if os.environ.get("R1_FAULT_KILL_WORKER") == str(step + 1):  # a test's crash, after step `step + 1`'s take
            self.kill_worker()
        return self.finished.pop(step)

    def carry(self) -> dict:
        """At a checkpoint (the trainer's weights: version `self.version`): the steps due under older weights,
        which a resumed run could not generate again - waited for, and kept."""
        keep = [s for s in range(self.version, min(self.version + self.K, self.steps))
                if self.due_version(s) < self.version]
        for step in keep:
            self._wait(step)
        return {s: self.finished[s] for s in keep}

    def kill_worker(self) -> None:
        """(A test's hand: the worker dies as a crash would kill it.)"""
        self.proc.kill()

    def __enter__(self) -> "RolloutStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.inbox.put(("stop",))
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


class _WorkerDied(Exception):
    pass


def _shared(weights) -> list:
    """(name, tensor) pairs on the CPU in shared memory: what a queue hands to another process without a copy per
    reader."""
    return [(name, t.detach().to("cpu").clone().share_memory_()) for name, t in weights]
