"""Verdicts a judged program cannot forge: function-call tests (HumanEval's `check(candidate)`) run here, in the
caller; the program in the sandbox only answers calls.

The judged program (a prompt and its completion) runs in the sandbox under a small server: the server reads the calls
it must answer from stdin, runs the program, then answers each call with the return value encoded as plain data (or
the exception it raised), one marked line per call. The test code, its asserts and the verdict run in this process,
on decoded values (lists, tuples, dicts, sets, numbers, strings, bytes, None: no object of the program's reaches the
test), against a proxy standing in for the function. Whatever the program does - end early in any way (sys.exit,
os._exit, an exit hook, a signal), print what the server prints, replace `check` or `assert` in its own process,
install a signal handler - leaves calls unanswered or answered by it, never a pass it did not earn.

The calls a test makes are found by running it first with its asserts made harmless and a stand-in value for every
call not answered yet (_Unknown); the program answers them all; then the test runs for its verdict on the answers.
A call that only then appears (its arguments made from earlier results) takes another round. The test's `random`
is seeded alike in every run, so a test that draws its arguments draws the same ones.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import random
from dataclasses import dataclass

MARK = "@r1-answer@ "  # the server's reply lines start with it
ROUNDS = 4  # rounds of calls before a test counts as failing to settle


def encode(value):
    """Plain data as JSON, tuples, sets, dicts with any plain keys, bytes and non-finite floats tagged; anything
    else is a TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(v) for v in value], "frozen": isinstance(value, frozenset)}
    if isinstance(value, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    raise TypeError(f"not plain data: {type(value).__name__}")


def decode(value):
    """The inverse of encode, building only plain data (the decoder runs in the trusted process)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__set__" in value:
        items = [decode(v) for v in value["__set__"]]
        return frozenset(items) if value.get("frozen") else set(items)
    if "__dict__" in value:
        return {decode(k): decode(v) for k, v in value["__dict__"]}
    if "__bytes__" in value:
        return bytes.fromhex(value["__bytes__"])
    raise ValueError(f"not an encoded value: {sorted(value)}")


# the server runs the program, then answers the calls; `encode` travels with it as source text
# (no json in there - the calls are a literal in the code, the replies Python literals, read here with
# ast.literal_eval: importing json (with re and enum) cost every judged program ~8 ms, 0.75x the throughput)
_SERVER = '''import sys as _r1_sys, math
_r1_calls = {calls}
{encoder}
_r1_ns = {{"__name__": "__main__"}}
exec(compile({program!r}, "solution.py", "exec"), _r1_ns)
_r1_fn = _r1_ns[{entry!r}]
for _r1_args in _r1_calls:
    try:
        _r1_reply = ["value", encode(_r1_fn(*[_r1_decode(a) for a in _r1_args]))]
    except BaseException as _r1_e:
        _r1_reply = ["raised", type(_r1_e).__name__ + ": " + str(_r1_e)[:300]]
    _r1_sys.stdout.write({mark!r} + repr(_r1_reply) + "\\n")
_r1_sys.stdout.flush()
'''


@functools.cache
def _encoder_source() -> str:
    import inspect

    decoder = inspect.getsource(decode).replace("def decode(", "def _r1_decode(").replace("decode(v)", "_r1_decode(v)")
    decoder = decoder.replace("decode(k)", "_r1_decode(k)")
    return inspect.getsource(encode) + "\n" + decoder


@dataclass(frozen=True)
class CallTest:
    """A function-call test: `setup` (trusted: the helpers the test uses, e.g. HumanEval's prompt), `program` (the
    judged code: prompt + completion), the function's name, and `test` (trusted code defining check(candidate))."""

    setup: str
    program: str
    entry_point: str
    test: str


class NeedAnswers(BaseException):  # not an Exception: a test's own `except Exception` must not swallow it
    pass


class CandidateRaised(Exception):
    pass


@dataclass
class Outcome:
    status: str  # pass | fail | need
    reason: str
    calls: list = None  # need: the encoded argument lists still to answer


class _Unknown:
    """What a call not answered yet returns while the calls are being found: it takes part in any comparison,
    arithmetic, indexing or iteration without stopping the test (every comparison holds)."""

    def _self(self, *args, **kwargs):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _self
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = _self
    __round__ = __getitem__ = __call__ = _self
    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = lambda self, other: True  # noqa: E731

    def __ne__(self, other):
        return False

    def __bool__(self):
        return True

    def __len__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __hash__(self):
        return 0

    def __float__(self):
        return 0.0

    def __int__(self):
        return 0

    __index__ = __int__

    def __getattr__(self, name):
        return self


class _HarmlessAsserts(ast.NodeTransformer):
    """`assert E` -> `try: E except Exception: pass`: the calls in E are made, nothing stops the test."""

    def visit_Assert(self, node):
        handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None, body=[ast.Pass()])
        return ast.copy_location(ast.Try(body=[ast.Expr(node.test)], handlers=[handler], orelse=[], finalbody=[]),
                                 node)


def _run_check(t: CallTest, candidate, finding: bool) -> None:
    """The test's check(candidate), here; `finding`: with its asserts made harmless."""
    ns: dict = {"__name__": "r1_check"}
    state = random.getstate()
    random.seed(0)  # a test that draws random arguments draws the same ones in every run
    try:
        exec(compile(t.setup, "prompt.py", "exec"), ns)
        ns[t.entry_point] = candidate
        tree = ast.parse(t.test, "test.py")
        if finding:
            tree = ast.fix_missing_locations(_HarmlessAsserts().visit(tree))
        exec(compile(tree, "test.py", "exec"), ns)
        ns["check"](candidate)
    finally:
        random.setstate(state)


def run_test(t: CallTest, answers: dict[str, list]) -> Outcome:
    """Run the test here against a proxy that returns the program's known answers (decoded). When it reaches a call
    not answered yet, it runs again to find every such call (need)."""

    def proxy(unknown):
        def candidate(*args):
            try:
                key = json.dumps(encode(list(args)))
            except TypeError:  # an argument made from a stand-in: asked again once its answer is known
                if unknown is not None:
                    return _Unknown()
                raise
            if key not in answers:
                if unknown is None:
                    raise NeedAnswers
                unknown.append(key)
                return _Unknown()
            kind, value = answers[key]
            if kind == "raised":
                raise CandidateRaised(value)
            return decode(value)

        return candidate

    try:
        _run_check(t, proxy(None), finding=False)
    except NeedAnswers:
        needed: list[str] = []
        try:
            _run_check(t, proxy(needed), finding=True)
        except Exception:  # noqa: S110 - finding stops at the first statement that cannot go on
            pass
        if not needed:
            return Outcome("fail", "the test's calls could not be found")
        return Outcome("need", "", sorted(set(needed)))
    except CandidateRaised as e:
        return Outcome("fail", f"the function raised {e}")
    except AssertionError as e:
        return Outcome("fail", f"a test failed{': ' + str(e) if str(e) else ''}")
    except Exception as e:  # the test could not go on with what the function returned
        return Outcome("fail", f"the test stopped: {type(e).__name__}: {str(e)[:200]}")
    return Outcome("pass", "passed")


def server(t: CallTest, calls: list[str]) -> tuple[str, str]:
    """The (code, stdin) the sandbox runs: the server around the judged program, the calls on stdin."""
    code = _SERVER.format(encoder=_encoder_source(), program=t.program, entry=t.entry_point, mark=MARK,
                          calls=repr([json.loads(c) for c in calls]))
    return code, ""


def read_answers(stdout: str, calls: list[str]) -> dict[str, list] | None:
    """The program's answers to `calls` from its output, or None when the output does not hold exactly one
    well-formed answer per call (the program ended early, or printed answers of its own)."""
    lines = [ln[len(MARK):] for ln in stdout.split("\n") if ln.startswith(MARK)]
    if len(lines) != len(calls):
        return None
    out = {}
    for call, line in zip(calls, lines):
        try:
            kind, value = ast.literal_eval(line)  # plain literals only: nothing of the program's runs here
            if kind not in ("value", "raised"):
                return None
            if kind == "value":
                decode(value)  # well-formed
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        out[call] = [kind, value]
    return out


def judge_many(tests: list[CallTest], run_many) -> list[tuple[bool, str]]:
    """(passed, reason) of each test. `run_many(jobs)` runs (code, stdin) jobs in the sandbox and returns their
    Results in order (the launchers' pool)."""
    answers: list[dict] = [{} for _ in tests]
    verdicts: list[tuple[bool, str] | None] = [None] * len(tests)
    for _ in range(ROUNDS):
        pending = []
        for i, t in enumerate(tests):
            if verdicts[i] is not None:
                continue
            o = run_test(t, answers[i])
            if o.status == "need":
                pending.append((i, o.calls))
            else:
                verdicts[i] = (o.status == "pass", o.reason)
        if not pending:
            break
        results = run_many([server(tests[i], calls) for i, calls in pending])
        for (i, calls), r in zip(pending, results):
            got = read_answers(r.stdout, calls) if r.status in ("ok", "error") else None
            if got is None:
                why = r.reason if not r.ok else "its output did not answer each call once"
                verdicts[i] = (False, f"the program did not answer the test's calls ({r.status}: {why})")
            else:
                answers[i].update(got)
    return [v if v is not None else (False, f"the test's calls did not settle in {ROUNDS} rounds") for v in verdicts]
