"""``python -m symile_kernels.train``: see ``symile_kernels.train.cli``."""
import sys

from .cli import main

sys.exit(main(prog="python -m symile_kernels.train"))
