"""``python -m uvood`` (and ``torchrun --nproc_per_node=N -m uvood ...``): the ``uvood`` command line."""

import sys

from .cli import console

sys.exit(console())
