"""The seams: what a trainer backend and a rollout engine must do, and the tables that name them.

The loops (sft, rl, and the stages built on them) talk only to these protocols and
never import torch.distributed, megatron or vllm; a backend is one registered module.
`build_trainer` / `build_engine` are the only way r1cli reaches `backends/`.

    ParallelContext   ranks and sizes; data shards and metric reductions go over the
                      data-parallel group, never the world (TP/PP ranks of one replica
                      see the same prompts)
    TrainerBackend    logprobs(batch) · train_step(batch, loss) · named_weights() ·
                      update_reference() · save/load/export_hf
    RolloutEngine     generate(token-id prompts, SamplingParams) · load_weights(named
                      tensors) · sleep/wake
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol

from r1cli.registry import Registry

if TYPE_CHECKING:
    import torch

    from r1cli.config import Config, EvalConfig, ModelConfig, RolloutConfig
    from r1cli.token_batch import TokenBatch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0  # prompt i of a generate call samples with seed + i
    logprobs: bool = False  # ask the engine for its log-prob of each sampled token (if it can give them)
    # engines that batch generate calls by prompts (transformers without rollout.tokens_per_generate): rows per
    # call instead of their prompts_per_generate x n; multi-turn continuations (n = 1) keep the first turn's rows
    rows_per_call: int = 0

    @classmethod
    def from_rollout(cls, r: "RolloutConfig", seed: int) -> "SamplingParams":
        return cls(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_new_tokens,
                   stop=tuple(r.stop), seed=seed, logprobs=True)

    @classmethod
    def from_eval(cls, e: "EvalConfig", stop: list[str], seed: int) -> "SamplingParams":
        return cls(n=e.n, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_new_tokens, stop=tuple(stop),
                   seed=seed)


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_tokens)
    logprobs: list[float] | None = None  # the engine's own per-token log-probs, when it reports them
    # multi-turn rollouts (r1cli.tools.turns): True for each completion token a tool wrote (context, not an action;
    # logprobs then hold the model's tokens only), and the turns and tool calls it took
    observation: list[bool] | None = None
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    # model.routing_replay: the experts each input position (prompt + completion) was routed to, [tokens, layers,
    # k] (-1 for the last token, which generation never fed back)
    routing: "torch.Tensor | None" = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class ParallelContext(Protocol):
    """Ranks and sizes (read-only), and the reductions the loops use."""

    @property
    def rank(self) -> int: ...  # global
    @property
    def world_size(self) -> int: ...
    @property
    def dp_rank(self) -> int: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def tp_rank(self) -> int: ...
    @property
    def tp_size(self) -> int: ...
    @property
    def pp_rank(self) -> int: ...
    @property
    def pp_size(self) -> int: ...
    @property
    def is_main(self) -> bool: ...  # global rank 0: writes shared files, prints
    @property
    def is_replica_leader(self) -> bool: ...  # the rank that generates for its model replica
    def share_in_replica(self, obj: Any) -> Any: ...  # the replica leader's obj on every rank of the replica
    def all_reduce_sum(self, value: float) -> float: ...  # over the data-parallel group
    def all_gather(self, obj: Any) -> list: ...  # over the data-parallel group, in dp-rank order
    def barrier(self) -> None: ...  # every rank


class LossInput(str, Enum):
    """What a loss consumes; a loss lists the inputs it can take and the trainer hands it one of them."""

    LOGPROBS = "logprobs"  # __call__(logp, entropy, batch): the scored tokens' log-probs (and entropies)
    # weighted_terms(batch, device, tokens=slice(None)) -> (token weights [N], per_token(logp, ent, a, b), to_sums):
    # the aggregation known before the forward, so a one-pass fused kernel forms the gradient in the forward;
    # `tokens`: a range of the batch's scored tokens (a context-parallel rank's own), the weights staying the whole
    # batch's
    WEIGHTED_TERMS = "weighted_terms"
    HIDDEN = "hidden"  # from_hidden(hidden, lm_head_weight, batch, targets): whole distributions (logit distillation)


class TokenLoss(Protocol):
    """A loss the trainer applies per micro-batch: SFT's NLL, GRPO's objective and distillation go through one door.

    `inputs` declares what the loss takes (LossInput, any order); `choose_loss_input` picks the one a trainer
    uses. The loss returns that micro-batch's share of the global loss (already normalised by the global batch)
    and metric sums; `finish` turns the sums, reduced over the data-parallel group, into metrics."""

    temperature: float
    wants_entropy: bool

    @property
    def inputs(self) -> "tuple[LossInput, ...]": ...

    def __call__(self, logp: "torch.Tensor", entropy: "torch.Tensor | None", batch: "TokenBatch"): ...
    def finish(self, sums: dict[str, float]) -> dict[str, float]: ...


def choose_loss_input(loss: TokenLoss, supported: "frozenset[LossInput]", one_pass: bool, backend: str) -> LossInput:
    """The input a trainer hands `loss`: whole distributions when that is all the loss takes, the one-pass weighted
    terms when asked for (parallel.torch.fused_linear=one_pass) and the loss can take them, log-probs otherwise."""
    takes = set(loss.inputs)
    if LossInput.HIDDEN in takes and LossInput.LOGPROBS not in takes:
        if LossInput.HIDDEN not in supported:
            from r1cli.errors import R1Error

            raise R1Error(f"{type(loss).__name__} needs whole output distributions (hidden states), which "
                          f"parallel.backend={backend} does not hand to a loss; use parallel.backend=torch")
        return LossInput.HIDDEN
    if one_pass and LossInput.WEIGHTED_TERMS in supported:
        if LossInput.WEIGHTED_TERMS not in takes:  # asked for, never silently ignored
            from r1cli.errors import R1Error

            raise R1Error(f"parallel.{backend}.fused_linear=one_pass needs per-token loss weights known before the "
                          f"forward, which {type(loss).__name__} does not give (GRPO with grpo.ratio_level=sequence "
                          "needs whole rows); use fused_linear=recompute")
        return LossInput.WEIGHTED_TERMS
    return LossInput.LOGPROBS


class TrainerBackend(Protocol):
    tokenizer: Any

    @property
    def parallel(self) -> ParallelContext: ...
    @property
    def device(self) -> "torch.device": ...  # where this rank computes (a frozen teacher goes there too)
    @property
    def model_parallel(self) -> bool: ...  # one model split over ranks (TP / PP); replicas see the same rows
    @property
    def loss_inputs(self) -> "frozenset[LossInput]": ...  # what it can hand a loss (choose_loss_input)

    @property
    def generation_model(self) -> Any:
        """The live policy module a colocated transformers engine may generate with, or None when this rank
        holds no whole copy (sharded or model-parallel): the engine then keeps its own, refreshed through
        named_weights()."""

    def logprobs(self, batch: "TokenBatch", which: str = "policy", temperature: float = 1.0) -> "torch.Tensor":
        """[B, C] log-probs of each row's scored tokens under the policy or the reference (0 past a row's end)."""

    def train_step(self, batch: "TokenBatch", loss: TokenLoss) -> dict:
        """One optimizer step over this rank's rows (split into micro-batches as the backend likes):
        returns loss.finish(...) plus grad_norm, lr and skipped (1.0 when a non-finite gradient skipped it)."""

    def named_weights(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """The policy's weights as (Hugging Face name, full tensor), one at a time (a collective: every rank
        iterates it)."""

    def update_reference(self) -> None: ...
    def save(self, directory: Path, extra: dict) -> None: ...
    def load(self, directory: Path) -> dict: ...
    def export_hf(self, directory: Path) -> None: ...


def engine_factory(*, reports_logprobs: bool):
    """Marks a registered engine factory with what its engines can do, readable before one is built:
    reports_logprobs - the engine returns its own per-token log-probs (what TIS and the mismatch metric need)."""

    def deco(fn):
        fn.reports_logprobs = reports_logprobs
        return fn

    return deco


def engine_reports_logprobs(name: str) -> bool:
    return bool(getattr(ENGINES.get(pick_engine(name), "rollout.engine"), "reports_logprobs", False))


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """params.n completions for each token-id prompt; prompt i samples with seed params.seed + i."""

    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Replace the engine's weights in place from (HF name, tensor) pairs."""

    def sleep(self) -> None: ...  # free the engine's memory while the trainer runs
    def wake(self) -> None: ...


# Implementations, imported only when chosen. A trainer class takes
# (ModelConfig, TrainConfig, OptimConfig, ParallelConfig, need_reference=bool);
# an engine factory takes (ModelConfig, RolloutConfig, trainer or None).
TRAINERS = Registry("trainer backend", "parallel.backend")
TRAINERS.register("torch", "r1cli.backends.torch_trainer:TorchTrainer")
TRAINERS.register("megatron", "r1cli.backends.megatron.trainer:MegatronTrainer")
ENGINES = Registry("rollout engine", "rollout.engine")
ENGINES.register("hf", "r1cli.backends.hf_rollout:create_engine")
ENGINES.register("vllm", "r1cli.backends.vllm_rollout:create_engine")


# Weight layouts between a Hugging Face folder and a backend's own (r1 convert NAME SRC DST ...)
CONVERTERS = Registry("weight converter", "r1 convert")
CONVERTERS.register("hf-to-megatron", "r1cli.backends.megatron.convert:hf_to_megatron")
CONVERTERS.register("megatron-to-hf", "r1cli.backends.megatron.convert:megatron_to_hf")


# The process layout for commands without a trainer (r1 eval, r1 sample): (device, tp, pp) -> ParallelContext
LAYOUTS = Registry("process layout")
LAYOUTS.register("torch", "r1cli.backends.parallel:init_parallel")


def build_parallel(device: str = "cpu") -> ParallelContext:
    """Join torchrun's process group (gloo for a CPU device) when launched by torchrun; one process otherwise."""
    import torch

    return LAYOUTS.get("torch")(torch.device(device))


def build_trainer(cfg: "Config", need_reference: bool = False, command: str = "sft") -> TrainerBackend:
    """The configured trainer backend; train.max_tokens_per_micro_batch=auto becomes the memory plan's budget for
    `command` (rl, sft, distill) on this machine, printed once."""
    train = cfg.train
    if train.max_tokens_per_micro_batch == "auto":
        import os
        import sys
        from dataclasses import replace

        from r1cli.run.memory_plan import auto_token_budget

        budget, note = auto_token_budget(cfg, command)
        if os.environ.get("RANK", "0") == "0":
            print(note, file=sys.stderr)
        train = replace(train, max_tokens_per_micro_batch=budget)
    cls = TRAINERS.get(cfg.parallel.backend)
    return cls(cfg.model, train, cfg.optim, cfg.parallel, need_reference=need_reference)


def build_critic(cfg: "Config", policy: TrainerBackend) -> TrainerBackend:
    """PPO's value model (grpo.advantage=gae): a second torch trainer from critic.path (model.path when empty) with a
    value head, its own AdamW at critic.lr, the policy's data-parallel layout and micro-batches (its token budget
    as the policy's trainer resolved it)."""
    from dataclasses import replace

    from r1cli.errors import R1Error

    if cfg.parallel.backend != "torch":
        raise R1Error(f"grpo.advantage=gae trains a critic on parallel.backend=torch; {cfg.parallel.backend} holds "
                      "no value model yet")
    model = replace(cfg.model, path=cfg.critic.path or cfg.model.path)
    optim = replace(cfg.optim, lr=cfg.critic.lr)
    train = getattr(policy, "train_cfg", cfg.train)
    return TRAINERS.get("torch")(model, train, optim, cfg.parallel, need_reference=False, value_head=True)


def pick_engine(name: str) -> str:
    """`auto`: vLLM on a GPU (where it is the fast one) if it is installed, transformers otherwise (on CPU vLLM is
    no faster: DESIGN.md)."""
    if name != "auto":
        return name
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


ENGINES.register("auto", lambda model, rollout, trainer=None: ENGINES.get(pick_engine("auto"))(model, rollout, trainer))


class TimedEngine:
    """An engine whose every wait (generate, weight sync, sleep, wake) ends with a message naming it after
    rollout.timeout_s, instead of hanging the run."""

    def __init__(self, engine: RolloutEngine, name: str, seconds: float):
        self.engine, self.name, self.seconds = engine, name, seconds

    def __getattr__(self, attr):  # anything else is the engine's own
        return getattr(self.engine, attr)

    def _limit(self, what: str):
        from r1cli.run.deadline import deadline

        return deadline(self.seconds, f"the {self.name} engine {what}", "rollout.timeout_s")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        with self._limit(f"to generate {params.n} completions for each of {len(prompts)} prompts"):
            return self.engine.generate(prompts, params)

    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        with self._limit("to load new weights from the trainer"):
            self.engine.load_weights(weights)

    def sleep(self) -> None:
        with self._limit("to sleep (free its memory)"):
            self.engine.sleep()

    def wake(self) -> None:
        with self._limit("to wake up"):
            self.engine.wake()


def build_engine(model: "ModelConfig", rollout: "RolloutConfig", trainer: TrainerBackend | None = None,
                 ) -> RolloutEngine:
    """An engine from configs alone (r1 sample, r1 eval), or colocated with a trainer whose weights it follows;
    building it and every later wait on it are under a time limit."""
    from r1cli.run.deadline import deadline

    name = pick_engine(rollout.engine)
    with deadline(rollout.start_timeout_s, f"the {name} engine to start", "rollout.start_timeout_s"):
        engine = ENGINES.get(name)(model, rollout, trainer)
    return TimedEngine(engine, name, rollout.timeout_s)


__all__ = ["SamplingParams", "Completion", "ParallelContext", "LossInput", "TokenLoss", "choose_loss_input",
           "TrainerBackend", "RolloutEngine", "TimedEngine", "TRAINERS", "ENGINES", "LAYOUTS", "CONVERTERS",
           "build_trainer", "build_critic", "build_engine", "build_parallel", "pick_engine", "engine_factory",
           "engine_reports_logprobs"]
