"""`python`: the call runs in the sandbox (r1cli.sandbox: its own process, time, memory, process and output limits,
no network as root). Its stdout is the observation; an exception's last line, a timeout or a limit is an error
observation. With limits.persist the sample's earlier calls run first with their output discarded, so variables
and imports carry over between turns (a fresh process each time: nothing else survives); without it every call
starts clean."""

from __future__ import annotations

from r1cli.tools import Observation, ToolLimits

PRELUDE = """import contextlib as _c, io as _io
_g = {"__name__": "__main__"}
for _cell in %r:
    with _c.redirect_stdout(_io.StringIO()), _c.redirect_stderr(_io.StringIO()):
        try:
            exec(compile(_cell, "<earlier call>", "exec"), _g)
        except BaseException:
            pass
exec(compile(%r, "<call>", "exec"), _g)
"""


def program(call: str, history: list[str], persist: bool) -> str:
    return PRELUDE % (list(history) if persist else [], call)


def python(call: str, history: list[str], limits: ToolLimits) -> Observation:
    from r1cli.sandbox.launcher import launch
    from r1cli.sandbox.run import Limits

    res = launch(program(call, history, limits.persist),
                      limits=Limits(wall_s=limits.timeout_s, cpu_s=max(1, int(limits.timeout_s))))
    if res.ok:
        return Observation(res.stdout)
    if res.status == "error":
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        return Observation(res.stdout + (lines[-1] if lines else "error"), error=True)
    return Observation(res.stdout + f"[{res.reason}]", error=True)
