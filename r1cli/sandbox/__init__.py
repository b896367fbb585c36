"""Safe execution of generated code: limits, namespaces, an unprivileged uid, always cleaned up."""

from .run import Limits, Result, isolation, run_many, run_program

__all__ = ["Limits", "Result", "isolation", "run_many", "run_program"]
