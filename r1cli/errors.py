"""The one exception type a user sees as a single line (no traceback)."""


class R1Error(Exception):
    """A problem with the user's input: a path, a config key, a data line.

    The CLI prints `error: <message>` and exits with status 2; code that
    raises it must say what was wrong and, where it can, how to fix it.
    """


def missing_extra(package: str, extra: str) -> R1Error:
    return R1Error(f"{package} is not installed; install it with: pip install 'r1[{extra}]'")
