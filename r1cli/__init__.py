"""r1: the DeepSeek-R1 training recipe as a command-line toolkit."""

__version__ = "0.1.0"
