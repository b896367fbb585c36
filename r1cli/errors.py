"""The one exception type a user sees as a single line (no traceback)."""


class R1Error(Exception):
    """A problem with the user's input: a path, a config key, a data line.

    The CLI prints `error: <message>` and exits with status 2; code that
    raises it must say what was wrong and, where it can, how to fix it.
    """


def missing_extra(package: str, extra: str) -> R1Error:
    return R1Error(f"{package} is not installed; install it with: pip install 'r1[{extra}]'")


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after a checkpoint of its last completed step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
