"""The one exception type a user sees as a single line (no traceback)."""


class R1Error(Exception):
    """A problem with the user's input: a path, a config key, a data line.

    The CLI prints `error: <message>` and exits with status 2; code that
    raises it must say what was wrong and, where it can, how to fix it.
    """


def missing_extra(package: str, extra: str) -> R1Error:
    return R1Error(f"{package} is not installed; install it with: pip install 'r1[{extra}]'")


class RunInterrupted(Exception):
    """SIGINT or SIGTERM (or the batch job's time limit) stopped a run after a checkpoint of its last completed step;
    the process exits with `exit_code` (128 + the signal, or OUT_OF_TIME)."""

    def __init__(self, message: str, signum: int, exit_code: int | None = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum if exit_code is None else exit_code


OUT_OF_TIME = 75  # EX_TEMPFAIL: stopped with a checkpoint before the job's time limit (launch.sh requeues it)
