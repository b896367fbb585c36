"""Completions that try to pass a HumanEval problem's tests without solving it (tests/unit/sandbox/test_harness.py,
tests/e2e/test_eval.py)."""

from r1cli.eval.benchmarks import humaneval_problems
from r1cli.sandbox.harness import MARK

PROBLEM = humaneval_problems()[0]  # has_close_elements(numbers, threshold) -> bool, seven asserts
FORGE = (f"import sys, os\nn = len([x for x in sys.stdin.read().split(chr(10)) if x.strip()])\n"
         f"sys.stdout.write({MARK!r} + '[\"value\", true]' + chr(10) * 1 + "
         f"''.join({MARK!r} + '[\"value\", false]' + chr(10) for _ in range(n - 1)))\nsys.stdout.flush()\n"
         "os._exit(0)\n")

# (name, completion: the body after the prompt, whether the old exit-status mechanism called it a pass)
HOSTILE = [
    ("os._exit(0) before the tests", "    return False\nimport os\nos._exit(0)\n", True),
    ("sys.exit(0) before the tests", "    return []\nimport sys\nsys.exit(0)\n", True),
    ("raise SystemExit(0)", "    return True\nraise SystemExit(0)\n", True),
    ("an exit hook that ends with 0", "    return True\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
     True),
    ("an excepthook that ends with 0", "    return True\nimport sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
     True),
    ("SystemExit(0) from the function", "    raise SystemExit(0)\n", True),
    ("os._exit(0) from the function", "    import os\n    os._exit(0)\n", True),
    ("a signal handler that ends with 0", "    return True\nimport signal, os\n"
     "signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nos.kill(os.getpid(), signal.SIGTERM)\n", True),
    ("check replaced", "    return True\ndef check(candidate):\n    pass\nimport builtins\n"
     "builtins.check = check\n", False),
    ("AssertionError patched away", "    return True\nimport builtins\nbuiltins.AssertionError = KeyboardInterrupt\n",
     False),
    ("the server's replies forged", "    return True\n" + FORGE, False),
    ("extra replies printed", f"    print({MARK!r} + '[\"value\", true]')\n    return True\n", False),
    ("an object equal to everything", "    class A:\n        def __eq__(self, o):\n            return True\n"
     "    return A()\n", False),
    ("json patched in the server", "    return True\nimport json\njson.dumps = lambda *a, **k: '[\"value\", true]'\n",
     False),
]
