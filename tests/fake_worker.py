"""`r1` with the protocol fakes registered, for multi-process tests under torchrun."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakes  # noqa: E402

fakes.register()

from r1cli.cli import run  # noqa: E402

run()
