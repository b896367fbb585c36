"""r1: the DeepSeek-R1 training recipe as a command-line toolkit."""

import os

__version__ = "0.1.0"

# MKL (torch's BLAS on x86 CPUs) picks code paths by memory alignment as well as by CPU, so a resumed run could round
# differently from the uninterrupted one (measured on an AVX-512 Xeon: loss 5.7852847 vs 5.7852842 after a resume).
# Its strict reproducibility mode takes one path whatever the alignment, at about the same speed (matmuls within 5%
# here; COMPATIBLE would be ~5x slower). MKL reads it at its first call, so setting it on import suffices; a user's
# own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
