"""r1: the DeepSeek-R1 training recipe as a command-line toolkit."""

import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

# MKL (torch's BLAS on x86 CPUs) picks code paths by memory alignment as well as by CPU, so a resumed run could round
# differently from the uninterrupted one (measured on an AVX-512 Xeon: loss 5.7852847 vs 5.7852842 after a resume).
# Its strict reproducibility mode takes one path whatever the alignment, at about the same speed (matmuls within 5%
# here; COMPATIBLE would be ~5x slower). MKL reads it at its first call, so setting it on import suffices; a user's
# own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# The design's top-level folders kernels/, backends/ and configs/ are the subpackages r1cli.kernels, r1cli.backends
# and r1cli.configs. They hold no __init__.py: a folder without one is only a namespace portion, which loses to a
# regular package of the same name anywhere on sys.path, so with the repository root on sys.path (`python -m
# pytest`, `python -c`, torchrun from the root) PyPI's `kernels` - which transformers >= 5.25 imports - is never
# hidden by ours. A wheel places the folders inside r1cli/; in a checkout they sit beside it, where neither
# setuptools' editable finder (it maps only folders with an __init__.py) nor a plain PYTHONPATH finds them: the
# finder below maps exactly these three names to the checkout's folders.
SUBPACKAGE_FOLDERS = ("backends", "configs", "kernels")


class _CheckoutFolders:
    """Finds r1cli.<folder> in a source checkout (a meta path finder; consulted only after the usual ones)."""

    def __init__(self, root: Path):
        self.folders = {f"{__name__}.{name}": root / name for name in SUBPACKAGE_FOLDERS}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = ModuleSpec(fullname, None, is_package=True)  # no loader + search locations: a namespace package
        spec.submodule_search_locations = [str(folder)]
        return spec


_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels").is_dir():
    sys.meta_path.append(_CheckoutFolders(_here.parent))
